"""Training. `trainer.train()` runs the stages of `stages` (run, model, data, network, inputs, optimizer, restore),
then `loop.run_loop`; `checkpointer`, `previews` and `steplog` act on the loop's steps; `metadata` builds the ss_*
keys; `checks` refuses impossible option combinations. Pure maths: `noise`, `losses`, `lr_schedules`, `optimizers`;
exact resume: `state`."""
