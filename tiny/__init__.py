"""The built-in tiny model, shared by both roles: the learner trains it, the actors serve it.

- :mod:`tiny.build`: ``ensure_model(cfg)`` (build, warm start, cache, lock) and its stamp;
- :mod:`tiny.tokenizer`: the character-level tokenizer;
- :mod:`tiny.data`: warm-start episodes as token ids and loss masks;
- :mod:`tiny.evaluate`: greedy evaluation with transformers, through the one episode loop (``envs.episode``).

``python -m tiny`` builds it from the command line. Nothing is imported here.
"""
