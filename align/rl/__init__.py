"""The online RL stage's parts; `align.rl.controller` drives them, `pipelines/rl.py` configures it.

- `rollout`: the data (sampling settings, scored rollout groups);
- `pool`: the prompt pool, re-filtered to a difficulty band;
- `buffer`: the rollout buffer and its one staleness rule;
- `worker`: a rollout worker (one vLLM engine that samples and scores groups);
- `learner`: one rank of the sharded learner group (FSDP2), and the step's split across ranks;
- `transport`: the learner's weights, gathered and converted, sent into the workers' engines;
- `group`: the learner ranks as Ray actors behind one learner's interface;
- `fleet`: every actor of a run (Ray, placement, replacement of failed workers);
- `placement`: where the actors go, and whether the learner fits the declared cluster;
- `state`: checkpoints, resume, snapshots and the data audit of a run;
- `controller`: the loop.
"""
