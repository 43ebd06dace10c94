"""dcrl actors: vLLM processes that play episodes and stream versioned trajectories to the replay queue.

- ``python -m actors`` (``actors/__main__.py``): one actor process, wired from the config.
- :mod:`actors.actor`: the episode loop (``run_episode``) and the ``Actor`` (admission, groups, stop).
- :mod:`actors.engine`: the vLLM ``AsyncLLM`` wrapper; every token carries the version that sampled it.
- :mod:`actors.weights`: weight announcements, verified files (local or fetched over ZMQ).
- :mod:`actors.envs`: the environment API and the built-in environments.

Nothing here imports vLLM, torch or transformers at module import time.
"""
