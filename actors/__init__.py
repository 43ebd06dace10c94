"""dcrl actors: vLLM processes that play episodes and stream versioned trajectories to the replay queue.

- ``python -m actors`` (``actors/__main__.py``): one actor process, wired from the config.
- :mod:`actors.actor`: the ``Actor``: the admit loop (ledger slots, groups, stop); episodes are played by
  ``envs.episode.run_episode``.
- :mod:`actors.engine`: the vLLM ``AsyncLLM`` wrapper; every token carries the version that sampled it.
- :mod:`actors.weight_sync`: weight announcements, verified files (local or fetched over ZMQ), the weights loop.
- :mod:`actors.transfer`: the actor's end of a collective (nccl/gloo) weight transfer.
- :mod:`actors.io`: blocking calls off the event loop, the liveness lease, the stop signal.
- :mod:`actors.vllm_ext`: code that runs inside vLLM's worker processes.
- :mod:`actors.sample`: ``python -m actors.sample``, a few episodes on real vLLM without Redis or learner.
- :mod:`actors.ray_launcher`: the Ray launcher (learner + N actor replicas on a cluster).

Actors never import ``learner``: the roles meet through ``buffer`` (Redis), ``protocol`` (the messages),
``weights`` (the weight format and transports) and the shared ``envs`` and ``tiny`` packages.

Nothing here imports vLLM, torch or transformers at module import time.
"""
