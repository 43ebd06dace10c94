"""Engine mismatch, measured on the real engines: vLLM (CPU) behaviour logprobs vs transformers fp32.

This is the floor of dcrl's discrepancy budget at lag 0. vLLM samples with ``logprobs_mode=
"processed_logprobs"`` and ``SamplingParams(logprobs=0)`` (the sampled token's logprob after
temperature); the trainer recomputes the same tokens in fp32. A float32 engine must agree closely;
a bfloat16 engine must differ measurably (that gap is what the learner budgets).

Each engine runs in its own subprocess (this file, run as a script): vLLM engines do not release
their threads and memory reliably inside one process, and a crash stays contained.
"""

from __future__ import annotations

import pytest

import json
import os
import subprocess
import sys
from pathlib import Path

pytestmark = pytest.mark.slow  # starts vLLM engines



N_PROMPTS = 48
MAX_TOKENS = 8
TEMPERATURE = 1.0



def sample_prompts(tokenizer) -> list[list[int]]:
    """Arithmetic problems and guess_number openings, as token ids."""
    from envs import make_env

    texts = [make_env("arithmetic", {}).reset(s) for s in range(N_PROMPTS - 8)]
    texts += ["guess 1-100:", "guess 1-100:50", "guess 1-100:50<eos>higher:"] * 2 + ["1+1=", "99+99="]
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def vllm_worker(model_dir: str, dtype: str, out_path: str) -> None:
    """Subprocess body: sample with vLLM in ``dtype``, write prompts, tokens and behaviour logprobs."""
    from actors.engine import vllm_cpu_env

    os.environ.update(vllm_cpu_env(kv_cache_gb=1))
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process: one process to clean up
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, dtype=dtype, enforce_eager=True, max_model_len=128,
              logprobs_mode="processed_logprobs", seed=0)
    prompts = sample_prompts(llm.get_tokenizer())
    params = [SamplingParams(temperature=TEMPERATURE, max_tokens=MAX_TOKENS, logprobs=0, seed=i)
              for i in range(len(prompts))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    records = []
    for p, o in zip(prompts, outs):
        c = o.outputs[0]
        lps = [step[tok].logprob for tok, step in zip(c.token_ids, c.logprobs)]
        records.append({"prompt": p, "tokens": list(c.token_ids), "logprobs": lps, "text": c.text})
    Path(out_path).write_text(json.dumps(records))


def run_vllm_subprocesses(model_dir: Path, dtypes: tuple[str, ...], out_dir: Path) -> dict[str, list[dict]]:
    """One worker subprocess per dtype, started together (engine start-up is mostly single-threaded
    imports, so two overlap well on 2 cores); killed if the test fails or times out."""
    repo = Path(__file__).resolve().parents[1]
    outs = {d: out_dir / f"vllm-{d}.json" for d in dtypes}
    procs = {d: subprocess.Popen([sys.executable, __file__, str(model_dir), d, str(outs[d])], cwd=repo,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for d in dtypes}
    try:
        logs = {d: p.communicate(timeout=300)[0] for d, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    for d, p in procs.items():
        assert p.returncode == 0, f"vLLM {d} worker failed:\n{logs[d][-4000:]}"
    return {d: json.loads(outs[d].read_text()) for d in dtypes}


def trainer_logprobs(model, records: list[dict]) -> list[list[float]]:
    """fp32 transformers logprobs (temperature applied) of each record's sampled tokens."""
    import torch

    from tiny.build import torch_threads

    result = []
    with torch.no_grad(), torch_threads(1):  # 2 contended OpenMP threads measured ~10x slower on 2 cores
        for r in records:
            ids = torch.tensor([r["prompt"] + r["tokens"]])
            logits = model(input_ids=ids).logits[0, :-1].float() / TEMPERATURE
            lp = torch.log_softmax(logits, -1)
            targets = ids[0, 1:]
            gathered = lp.gather(-1, targets[:, None])[:, 0]
            result.append(gathered[len(r["prompt"]) - 1:].tolist())
    return result


def mean_abs_dlogp(records: list[dict], reference: list[list[float]]) -> float:
    """mean over all sampled tokens of |log mu(a_t) - log pi(a_t)|."""
    diffs = [abs(a - b) for r, ref in zip(records, reference) for a, b in zip(r["logprobs"], ref)]
    assert diffs, "no sampled tokens"
    return sum(diffs) / len(diffs)


def test_engine_mismatch_fp32_small_bf16_large(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype="float32").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    figures = {}
    for dtype, records in run_vllm_subprocesses(tiny_model_dir, ("float32", "bfloat16"), tmp_path).items():
        assert sum(len(r["tokens"]) for r in records) >= N_PROMPTS  # at least one token each
        # vLLM's incremental detokenizer yields exactly the text of the tokens (EOS excluded).
        assert [r["text"] for r in records] == \
            [tokenizer.decode(r["tokens"], skip_special_tokens=True) for r in records]
        figures[dtype] = mean_abs_dlogp(records, trainer_logprobs(model, records))
    print(f"\nengine mismatch mean |dlogp| vs transformers fp32: vLLM fp32 {figures['float32']:.2e}, "
          f"vLLM bf16 {figures['bfloat16']:.2e}")
    assert figures["float32"] < 1e-3
    assert figures["bfloat16"] > 5 * figures["float32"]
    assert figures["bfloat16"] > 1e-3


if __name__ == "__main__":
    vllm_worker(*sys.argv[1:4])
