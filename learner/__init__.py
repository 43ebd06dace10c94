"""dcrl learner: consumes trajectory groups from the Redis buffer, trains, publishes weights.

- ``trainer``: the training loop (``python -m learner``) and the wiring of its components;
- ``discrepancy``, ``controller``, ``loss``: discrepancy metrics, the DCMDP controller, the policy loss;
- ``publisher``: versioned weight directories and the ZMQ announcement (files served by ``weights.fileserver``);
- ``transfer``: the learner's end of a collective (nccl/gloo) weight transfer;
- ``checkpoint``: atomic checkpoints and the resume bookkeeping;
- ``distributed``: the learner over N ranks (``learner.world_size``): FSDP2, rank 0 the only one that talks;
- ``metrics``: metrics.jsonl, wandb, progress bar, report.png.

The learner never imports ``actors``: the built-in tiny model is ``tiny``, the weight format ``weights``.

Nothing is imported here: ``python -m learner --help`` must not pay for torch.
"""
