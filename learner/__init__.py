"""dcrl learner: consumes trajectory groups from the Redis buffer, trains, publishes weights.

- ``trainer``: the training loop (``python -m learner``) and the wiring of its components;
- ``discrepancy``, ``controller``, ``loss``: discrepancy metrics, the DCMDP controller, the policy loss;
- ``publisher``: versioned weight directories, ZMQ announcement and file server;
- ``checkpoint``: atomic checkpoints and the resume bookkeeping;
- ``metrics``: metrics.jsonl, wandb, progress bar, report.png;
- ``tiny``, ``weights_io``: the built-in tiny model and the published weight file.

Nothing is imported here: ``python -m learner --help`` must not pay for torch.
"""
