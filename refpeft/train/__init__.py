"""Training adapters (or every weight) on the whole decoder, step for step as transformers' Trainer + PEFT.

    schedules.py    learning-rate multipliers (transformers' constant/linear/cosine with warm-up)
    gradients.py    micro-batch accumulation and clipping by the global norm (torch's clip_grad_norm_)
    data.py         text packed into blocks; instruction/chat JSONL with response-only labels; batches
    adapters.py     a fresh adapter initialised as PEFT does; the trained tensors as one flat dict;
                    the optimiser's parameter groups (Trainer's weight-decay split, LoRA+)
    state.py        TrainingConfig (the hyper-parameters) and TrainingState (where a run stands)
    loop.py         one optimiser step and the loop around it
    checkpoints.py  atomic checkpoints and exact resumption

The optimiser itself is refpeft.optim (torch's Adam/AdamW/LoRA+); the model, its loss and its
gradients are refpeft.model.decoder; `refpeft train` (refpeft.commands.train) is the command line.
"""
