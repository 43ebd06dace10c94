"""TextArena single-player games as a multi-turn dcrl environment (optional: ``pip install textarena``, or the
project's ``tasks`` extra).

    [env]
    name = "textarena"
    kwargs = { game = "GuessTheNumber-v0" }

TextArena is a library of text games written for LLM agents (Wordle, GuessTheNumber, Minesweeper, ...); its
single-player games are what a multi-turn RL user brings to TRL or prime-rl. One dcrl episode is one game:
``reset(seed)`` starts it (``num_players = 1``) and returns the game's first observation; each model turn goes
to the game as the player's action, and the observation after it is what the game added since the previous
one, without the game's echo of the move (TextArena's observations repeat the whole history; the episode
already holds it). When the game ends,
the reward is the player's final reward from ``env.close()`` (TextArena's scale, often -1, 0 or 1).
``first_observation`` replaces the game's own introduction (several hundred characters: more than a small
model's context) with a text of yours.

The games run on the actor's event loop thread through ``envs.guard`` (``env.step_timeout_s`` applies).
"""

from __future__ import annotations

from envs import EnvError, StepResult


def drop_echo(text: str) -> str:
    """The game's new text without its echo of the player's move (``[Player] ...``, the line the model's turn
    already is in the episode)."""
    body = text.lstrip("\n")
    if body.startswith("[Player]"):
        _, _, rest = body.partition("\n")
        return "\n" + rest if rest else ""
    return text


class TextArenaEnv:
    """One TextArena game per episode; see the module docstring."""

    def __init__(self, game: str, player_id: int = 0, first_observation: str | None = None):
        try:
            import textarena
        except ImportError:
            raise EnvError("env 'textarena' needs the textarena package: pip install textarena "
                           "(or the project's 'tasks' extra)") from None
        try:
            self.env = textarena.make(env_id=game)
        except Exception as e:  # an unknown id: one line naming it
            raise EnvError(f"textarena: cannot make game {game!r}: {type(e).__name__}: {e}") from None
        self.game, self.player_id, self.first_observation = game, int(player_id), first_observation
        self._seen = ""

    def _new_text(self) -> str:
        """The part of the game's observation not returned yet (the whole of it if the game rewrote it)."""
        _, obs = self.env.get_observation()
        text = obs if isinstance(obs, str) else str(obs)
        new = text[len(self._seen):] if text.startswith(self._seen) else text
        self._seen = text
        return new

    def reset(self, seed: int) -> str:
        self.env.reset(num_players=1, seed=int(seed) % (1 << 31))
        self._seen = ""
        intro = self._new_text().strip() or f"[{self.game}]"
        return intro if self.first_observation is None else self.first_observation

    def step(self, action: str) -> StepResult:
        done, _info = self.env.step(action=action)
        if not done:
            return StepResult(observation=drop_echo(self._new_text()), reward=0.0, done=False)
        rewards, _game_info = self.env.close()
        reward = float((rewards or {}).get(self.player_id, 0.0))
        return StepResult(observation="", reward=reward, done=True)
