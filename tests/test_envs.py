"""Built-in environments and the environment loader (actors/envs.py)."""

from __future__ import annotations

import statistics
import sys
import textwrap

import pytest

from envs import Arithmetic, ChainSum, Env, EnvError, GuessNumber, StepResult, guess_reward, make_env, parse_int

CHARSET = "\n" + "".join(chr(c) for c in range(32, 127))  # the tiny tokenizer's characters


def solve_prompt(prompt: str) -> int:
    """Reference answer read back from the text the model sees, e.g. '37+48=' -> 85."""
    a, b = prompt.rstrip("=").split("+")
    return int(a) + int(b)


def binary_search_episode(env: GuessNumber, seed: int) -> tuple[StepResult, int, list[str]]:
    """Scripted policy: guess the midpoint of the feasible range; returns (last result, turns, observations)."""
    observations = [env.reset(seed)]
    lo, hi = 1, env.hi
    turns = 0
    while True:
        guess = (lo + hi) // 2
        result = env.step(str(guess))
        turns += 1
        observations.append(result.observation)
        if result.done:
            return result, turns, observations
        if result.observation == "higher:":
            lo = guess + 1
        else:
            assert result.observation == "lower:"
            hi = guess - 1


def test_arithmetic_exact_answer_rewarded():
    for seed in range(50):
        env = make_env("arithmetic", {})
        prompt = env.reset(seed)
        assert prompt.endswith("=") and len(prompt) == 6  # two 2-digit operands
        result = env.step(str(solve_prompt(prompt)))
        assert result == StepResult(observation="", reward=1.0, done=True)


def test_arithmetic_wrong_or_garbled_answer_gets_zero():
    env = make_env("arithmetic", {})
    answer = solve_prompt(env.reset(7))
    for bad in (str(answer + 1), "", "abc", f"{answer}0", f"{answer}+1"):
        env = make_env("arithmetic", {})
        env.reset(7)
        result = env.step(bad)
        assert result.done and result.reward == 0.0, bad


def test_arithmetic_same_seed_same_problem_and_seeds_vary():
    assert make_env("arithmetic", {}).reset(3) == make_env("arithmetic", {}).reset(3)
    assert len({make_env("arithmetic", {}).reset(s) for s in range(100)}) > 90


def test_arithmetic_kwargs_digits_and_op():
    env = make_env("arithmetic", {"digits": 3, "op": "*"})
    prompt = env.reset(1)
    a, b = prompt.rstrip("=").split("*")
    assert len(a) == len(b) == 3
    assert env.step(str(int(a) * int(b))).reward == 1.0


def test_guess_number_binary_search_averages_five_plus_turns():
    turns, rewards = [], []
    for seed in range(300):
        result, n, _ = binary_search_episode(GuessNumber(), seed)
        assert result.done and result.observation == "correct"
        assert result.reward == pytest.approx(guess_reward(n))
        turns.append(n)
        rewards.append(result.reward)
    assert 5.0 <= statistics.mean(turns) <= 7.0
    assert max(turns) <= 7  # ceil(log2(101))
    assert 0.6 < statistics.mean(rewards) < 1.0


def test_guess_number_fails_at_turn_limit_with_zero_reward():
    env = GuessNumber(hi=100, max_turns=4)
    target = GuessNumber.hidden_number(11, 100)
    env.reset(11)
    wrong = str(1 if target != 1 else 2)
    results = [env.step(wrong) for _ in range(4)]
    assert [r.done for r in results] == [False, False, False, True]
    assert results[-1].reward == 0.0
    assert all(r.reward == 0.0 for r in results)


def test_guess_number_invalid_answer_counts_as_a_turn():
    env = GuessNumber(max_turns=12)
    env.reset(5)
    r = env.step("fifty")
    assert (r.observation, r.done, env.turns) == ("number?:", False, 1)
    result, n, _ = binary_search_episode(env, 5)  # reset: the count starts again
    assert result.reward == pytest.approx(guess_reward(n))


def test_guess_reward_decays_per_turn_to_floor():
    assert guess_reward(1) == 1.0
    assert guess_reward(2) == pytest.approx(0.95)
    assert guess_reward(7) == pytest.approx(0.70)
    assert guess_reward(40) == pytest.approx(0.1)
    assert all(guess_reward(t) >= guess_reward(t + 1) for t in range(1, 30))


def test_builtin_observations_stay_in_tokenizer_charset():
    texts = []
    for seed in range(50):
        texts.append(make_env("arithmetic", {}).reset(seed))
        texts += binary_search_episode(GuessNumber(), seed)[2]
    env = GuessNumber(max_turns=2)
    env.reset(0)
    texts += [env.step("x").observation, env.step("0").observation]
    assert set("".join(texts)) <= set(CHARSET)


def test_chain_sum_rewards_the_final_number_of_a_worked_answer():
    env = make_env("chain_sum", {"terms": 4})
    prompt = env.reset(3)
    nums = [int(x) for x in prompt.rstrip("=").split("+")]
    assert len(nums) == 4 and all(10 <= x <= 99 for x in nums)
    worked = env.worked_answer()
    assert worked.count(",") == 2 and worked.endswith(f"={sum(nums)}")
    assert env.step(worked).reward == 1.0
    assert env.step(str(sum(nums))).reward == 1.0  # only the final number is graded
    assert env.step(worked + "1").reward == 0.0 and env.step("").reward == 0.0
    assert set(prompt + worked) <= set(CHARSET)
    assert ChainSum(terms=6).reset(3) != prompt and ChainSum(terms=4).reset(3) == prompt
    with pytest.raises(EnvError, match="terms must be in"):
        ChainSum(terms=1)


def test_builtins_satisfy_env_protocol():
    assert isinstance(make_env("arithmetic", {}), Env)
    assert isinstance(make_env("guess_number", {"hi": 10, "max_turns": 3}), Env)


def test_parse_int_accepts_only_plain_integers():
    assert parse_int(" 42 ") == 42
    assert parse_int("-7") == -7
    assert [parse_int(s) for s in ("", "4 2", "4.0", "+4", "x", "-")] == [None] * 6


def test_make_env_loads_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_envs.py").write_text(textwrap.dedent("""
        from envs import StepResult

        class Echo:
            def __init__(self, word="ping"):
                self.word = word
            def reset(self, seed):
                return f"say {self.word}:"
            def step(self, action):
                return StepResult(observation="", reward=float(action == self.word), done=True)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    env = make_env("my_envs:Echo", {"word": "pong"})
    assert env.reset(0) == "say pong:"
    assert env.step("pong").reward == 1.0
    sys.modules.pop("my_envs", None)


@pytest.mark.parametrize("name, fragment", [
    ("no_such_module_xyz:Env", "cannot import module 'no_such_module_xyz'"),
    ("envs:NoSuchClass", "has no attribute 'NoSuchClass'"),
    ("envs:parse_int", "is not an Env class"),
    ("nonsense", "not a built-in"),
])
def test_make_env_errors_name_the_path(name, fragment):
    with pytest.raises(EnvError) as err:
        make_env(name, {})
    assert fragment in str(err.value)
    assert name in str(err.value)


def test_make_env_bad_kwargs_error_names_env():
    with pytest.raises(EnvError, match="guess_number.*bad kwargs"):
        make_env("guess_number", {"hi_typo": 3})
    with pytest.raises(EnvError, match="hi must be >= 2"):
        make_env("guess_number", {"hi": 1})


def test_step_before_reset_is_an_error():
    with pytest.raises(RuntimeError):
        Arithmetic().step("1")
    with pytest.raises(RuntimeError):
        GuessNumber().step("1")


def test_env_factory_checks_once_and_makes_fresh_instances():
    from envs import EnvError, env_factory

    new_env = env_factory("guess_number", {"hi": 10})
    a, b = new_env(), new_env()
    assert a is not b and isinstance(a, GuessNumber) and a.hi == 10
    with pytest.raises(EnvError, match="bad kwargs"):
        env_factory("guess_number", {"colour": 1})
    with pytest.raises(EnvError, match="not a built-in"):
        env_factory("nope")


def test_make_env_import_errors_say_how_the_module_is_found(tmp_path, monkeypatch):
    with pytest.raises(EnvError, match="imported from sys.path.*PYTHONPATH"):
        make_env("no_such_module_xyz:Env", {})
    (tmp_path / "needs_missing_dep.py").write_text("import no_such_dependency_xyz\n")
    (tmp_path / "broken_top_level.py").write_text("raise RuntimeError('bad top level')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(EnvError) as err:  # the module is found; what it imports is not: no sys.path hint
        make_env("needs_missing_dep:Env", {})
    assert "no_such_dependency_xyz" in str(err.value) and "PYTHONPATH" not in str(err.value)
    with pytest.raises(EnvError, match="importing module 'broken_top_level' raised RuntimeError: bad top level"):
        make_env("broken_top_level:Env", {})
    for name in ("needs_missing_dep", "broken_top_level"):
        sys.modules.pop(name, None)
