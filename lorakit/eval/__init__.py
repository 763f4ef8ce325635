"""Checkpoint evaluation (`lorakit eval`, issue 17): which saved LoRA of a run to use, read from the user's own data.

    concept.py   trigger, class prompt, core and scene tags read from the training captions and images; the prompts
    sampling.py  fixed-seed samples of many prompts in one batch (the generation layer's conditioning and samplers)
    taggers.py   what reads the samples: a WD14 ONNX tagger folder (checked naming the caller's flag), or the toy
                 world's classifier (an adapter)
    scores.py    the scores as plain functions (concept recall, adherence, prior drift, memorisation), the
                 recommendation and the Pareto set
    runner.py    the base model sampled once, each checkpoint merged, sampled and taken out again
    report.py    JSON, table, chart over steps and contact sheet next to the LoRAs
    api.py       `run_eval(EvalJob)`: the one call behind the CLI and the GUI's Eval tab
    training.py  --eval_every_n_epochs / --eval_every_n_steps: the same on the files a run saves; its tagger is
                 checked in the trainer's preflight, before the model loads
"""
