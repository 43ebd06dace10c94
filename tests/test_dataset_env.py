"""Dataset environments with verifiers (envs/dataset.py, envs/verifiers.py) and the shared draw counter."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from buffer import ControlPlane
from configs import load_config
from configs.schema import RedisConfig
from envs import EnvError, make_env, resolve_env_class
from envs.dataset import DatasetEnv, row_of_draw
from envs.verifiers import last_number, numeric, resolve_verifier
from tiny.data import dataset_segments

ROOT = Path(__file__).resolve().parents[1]
TINY_MATH = ROOT / "data" / "tiny_math"


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_every_row_once_per_epoch_and_epochs_differ(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "answer": str(i)} for i in range(50)])
    env = make_env("dataset", {"path": path, "shuffle_seed": 3})
    epoch0 = [env.reset(d) for d in range(50)]
    epoch1 = [env.reset(d) for d in range(50, 100)]
    assert sorted(epoch0) == sorted(epoch1) == sorted(f"q{i}" for i in range(50))
    assert epoch0 != epoch1 and epoch0 != [f"q{i}" for i in range(50)]
    assert [row_of_draw(d, 50, 3) for d in range(5)] == [row_of_draw(d, 50, 3) for d in range(5)]  # deterministic


def test_reward_is_the_verifiers_verdict_on_the_reference_answer(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "2+2", "solution": "4"}])
    env = make_env("dataset", {"path": path, "prompt_format": "Q: {question} A:", "answer_key": "solution",
                               "verifier": "numeric"})
    assert env.reset(0) == "Q: 2+2 A:"
    assert env.step("it is 4").reward == 1.0 and env.step("5").reward == 0.0 and env.step("").reward == 0.0
    exact = make_env("dataset", {"path": path, "prompt_key": "question", "answer_key": "solution"})
    exact.reset(0)
    assert exact.step(" 4 ").reward == 1.0 and exact.step("4.0").reward == 0.0


def test_numeric_verifier_reads_the_last_number():
    assert last_number("so 12, then 1,234.50") == pytest.approx(1234.5)
    assert numeric("x = 5/2", "2.5") == 1.0 and numeric("-3", "-3") == 1.0 and numeric("3", "-3") == 0.0
    assert numeric("no number", "1") == 0.0 and numeric("7", "seven") == 0.0


def test_user_verifier_by_import_path_and_errors_that_name_the_problem(tmp_path, monkeypatch):
    (tmp_path / "my_verifiers.py").write_text("def length(completion, answer):\n    return float(len(completion))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_verifier("my_verifiers:length")("abc", None) == 3.0
    with pytest.raises(EnvError, match="not a built-in"):
        resolve_verifier("fuzzy")
    with pytest.raises(EnvError, match="no function 'nope'"):
        resolve_verifier("my_verifiers:nope")
    with pytest.raises(EnvError, match="cannot import module"):
        resolve_verifier("no_such_module_xyz:f")


def test_dataset_errors_name_the_kwarg(tmp_path):
    with pytest.raises(EnvError, match="no file"):
        make_env("dataset", {"path": str(tmp_path / "missing.jsonl")})
    with pytest.raises(EnvError, match="missing 1 required argument: 'path'|required.*path"):
        make_env("dataset", {})
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "x", "a": "1"}])
    with pytest.raises(EnvError, match="no field 'answer' \\(answer_key\\)"):
        make_env("dataset", {"path": path})
    with pytest.raises(EnvError, match="no field 'prompt' \\(prompt_key\\)"):
        make_env("dataset", {"path": path, "answer_key": "a"})
    with pytest.raises(EnvError, match="prompt_format"):
        make_env("dataset", {"path": path, "answer_key": "a", "prompt_format": "{question}"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "answer": "1"}\nnot json\n')
    with pytest.raises(EnvError, match="line 2: not JSON"):
        make_env("dataset", {"path": str(bad)})


def test_parquet_is_read_with_pyarrow_or_refused_with_the_install_hint(tmp_path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # the optional extra is not installed: the error says how to get it
        (tmp_path / "d.parquet").write_bytes(b"PAR1")
        with pytest.raises(EnvError, match="needs pyarrow"):
            make_env("dataset", {"path": str(tmp_path / "d.parquet")})
        return
    pq.write_table(pa.table({"prompt": ["a", "b"], "answer": ["1", "2"]}), tmp_path / "d.parquet")
    env = make_env("dataset", {"path": str(tmp_path / "d.parquet")})
    assert sorted(env.reset(d) for d in range(2)) == ["a", "b"]


def test_draws_are_shared_by_concurrent_actors_and_restored_upward_only(redis_url):
    plane = ControlPlane(RedisConfig(url=redis_url, connect_timeout_s=5.0))
    got: list[int] = []
    lock = threading.Lock()

    def actor():
        mine = ControlPlane(RedisConfig(url=redis_url, connect_timeout_s=5.0))
        for _ in range(50):
            d = mine.next_draw()
            with lock:
                got.append(d)
        mine.close()

    threads = [threading.Thread(target=actor) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(200)) and plane.draws() == 200
    assert plane.restore_draws(150) == 200 and plane.draws() == 200  # never lowered
    plane.reset()
    assert plane.draws() == 0 and plane.restore_draws(120) == 120 and plane.next_draw() == 120


def test_tiny_math_preset_data_and_teacher():
    cfg = load_config("tiny_math", [], env={})
    assert cfg.env.chat and resolve_env_class(cfg.env.name) is DatasetEnv
    train = [json.loads(x) for x in (TINY_MATH / "train.jsonl").read_text().splitlines()]
    test = [json.loads(x) for x in (TINY_MATH / "test.jsonl").read_text().splitlines()]
    assert len(train) == 4000 and len(test) == 400
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}  # held out
    from tiny.tokenizer import CHARSET

    assert all(set(r["prompt"] + r["answer"]) <= set(CHARSET) for r in train + test)
    env = make_env(cfg.env.name, cfg.env.kwargs)
    for draw in range(20):  # the teacher's answer earns the reward: the data and the verifier agree
        (prompt, _), (answer, _) = dataset_segments(draw, **cfg.env.kwargs)
        assert env.reset(draw) == prompt and env.step(answer).reward == 1.0


def test_shipped_data_is_what_the_generator_writes(tmp_path):
    from tiny.math_data import write

    write(out=tmp_path)
    for split in ("train", "test"):
        assert (tmp_path / f"{split}.jsonl").read_text() == (TINY_MATH / f"{split}.jsonl").read_text()
