"""Evaluation of checkpoints (`python -m tmlx.eval losses|duplex ...`).

- `tmlx.eval.losses`: per-stream losses and sampled-mel error on held-out rows, with ablations;
- `tmlx.eval.duplex`: full-duplex behaviour (turn-taking, answers, barge-in, background calls, audio) of
  streaming sessions on held-out conversations: its metrics and command line, over
  `conversations` (the held-out conversations), `speakers` (what speaks for the model), `scoring`
  (the scores of one conversation), `evaluation` (a model over every conversation, and the probe of
  a training run) and `report` (outputs and logs).

Submodules are imported on use, so that `import tmlx.eval` stays cheap.
"""
