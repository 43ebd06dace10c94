"""Weight sync: from the learner's publish to an actor's vLLM engine serving the new version, files vs a
collective broadcast, measured side by side on one engine in one run.

Per repeat, one new version each way (alternating, same model, same engine):

- files, shared disk: ``WeightPublisher.publish`` writes ``weights/vXXXXXX`` (safetensors + sha256),
  the actor verifies the digest (``actors.weight_sync.resolve_weights``) and reloads (pause -> reload -> resume);
- files, no shared disk: the same, but the actor fetches the file over ZMQ from the learner first;
- gloo: ``publish`` snapshots the weights, the actor pulls and vLLM's weight-transfer engine receives the
  broadcast (pause -> start -> update -> finish -> resume); no file. ("nccl" is the same path on GPUs.)

Reported per way: the learner's blocking time (``publish``: what the training loop pays) and the total
publish-to-serving time, medians over repeats. The default model is a wider tiny Qwen3 (random weights,
~200 MB in fp32) so that bytes matter; any ``--set model.tiny.*`` works.

    python bench/weight_sync.py [--repeats 5] [--set model.tiny.hidden_size=512]

Last line: ``RESULT weight_sync_files_over_gloo <median files (shared disk) total / median gloo total>``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import add_config_args, load_config  # noqa: E402

MODEL = ["model.tiny.hidden_size=768", "model.tiny.num_layers=8", "model.tiny.intermediate_size=2048",
         "model.tiny.num_heads=12", "model.tiny.warmstart_steps=0",
         "model.tiny.warmstart_eval_episodes=10"]


def perturb(model, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 1e-3)


async def bench(cfg_files, cfg_gloo, model_dir: Path, workdir: Path, repeats: int) -> dict[str, list]:
    import torch
    from transformers import AutoModelForCausalLM

    from actors.engine import Engine
    from actors.transfer import TransferClient
    from actors.weight_sync import resolve_weights
    from learner.publisher import WeightPublisher
    from protocol.messages import WeightsReady

    engine = await Engine.start(cfg_gloo, model_dir)  # a gloo-enabled engine reloads files as well
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    nbytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    files = WeightPublisher(cfg_files.learner, workdir / "run-files", model_dir, actor_dtype=cfg_files.actor.dtype)
    gloo = WeightPublisher(cfg_gloo.learner, workdir / "run-gloo", model_dir, actor_dtype=cfg_gloo.actor.dtype)
    client = TransferClient(cfg_gloo.learner.zmq_transfer, "bench-actor", timeout_s=120)
    times: dict[str, list] = {k: [] for k in ("files", "fetch", "gloo")}
    print(f"engine {engine.tag}, model {model_dir.name}: {nbytes / 1e6:.1f} MB fp32 state dict", flush=True)
    try:
        await client.join(engine)
        v = 0
        for rep in range(-1, repeats):  # repeat -1 warms every path up and is not reported
            for way in ("files", "fetch", "gloo"):
                v += 1
                perturb(model, v)
                t0 = time.perf_counter()
                if way == "gloo":
                    w = gloo.publish(model, v)
                    t_pub = time.perf_counter() - t0
                    got, _ = await client.pull_into(engine, w.version)
                    assert got == v
                else:
                    w = files.publish(model, v)
                    t_pub = time.perf_counter() - t0
                    if way == "fetch":  # as seen from a machine without the learner's disk
                        w = WeightsReady(version=v, path="/nonexistent", sha256=w.sha256, url=w.url)
                    d = await asyncio.to_thread(resolve_weights, w, workdir / "cache")
                    await engine.load_weights(d, v)
                total = time.perf_counter() - t0
                assert engine.version == v
                if rep >= 0:
                    times[way].append((t_pub, total))
            if rep >= 0:
                print(f"repeat {rep}: " + "   ".join(f"{k} publish {1000 * t[-1][0]:6.1f} ms, total "
                                                      f"{1000 * t[-1][1]:6.1f} ms" for k, t in times.items()),
                      flush=True)
    finally:
        client.close()
        files.close()
        gloo.close()
        await engine.shutdown()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_args(ap)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from buffer.server import free_port

    workdir = Path(tempfile.mkdtemp(prefix="dcrl-bench-weights-"))
    base = MODEL + [f"model.path={workdir / 'model'}", "model.build_tiny=true"] + args.overrides

    def cfg(transport: str):
        return load_config(args.config, base + [
            f"learner.weight_transfer={transport}", f"learner.zmq_pub=tcp://127.0.0.1:{free_port()}",
            f"learner.zmq_files=tcp://127.0.0.1:{free_port()}", f"learner.zmq_transfer=tcp://127.0.0.1:{free_port()}",
            "learner.keep_versions=2"], env={})

    cfg_files, cfg_gloo = cfg("files"), cfg("gloo")
    from actors.engine import prepare_device_env
    from tiny.build import ensure_model

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    prepare_device_env(cfg_gloo, replica=0)
    model_dir = ensure_model(cfg_gloo, log=lambda *a: None)
    times = asyncio.run(bench(cfg_files, cfg_gloo, Path(model_dir), workdir, args.repeats))
    med = {k: (statistics.median(p for p, _ in t), statistics.median(x for _, x in t)) for k, t in times.items()}
    for k, (p, x) in med.items():
        print(f"median {k:5s}: learner blocked {1000 * p:7.1f} ms, publish to serving {1000 * x:7.1f} ms")
    print(f"ratios over gloo: files {med['files'][1] / med['gloo'][1]:.2f}, files fetched "
          f"{med['fetch'][1] / med['gloo'][1]:.2f}; learner blocked: files {med['files'][0] / med['gloo'][0]:.2f}")
    print(f"RESULT weight_sync_files_over_gloo {med['files'][1] / med['gloo'][1]:.3f}")


if __name__ == "__main__":  # vLLM starts its engine with multiprocessing spawn: the guard is required
    main()
