"""LoRA on the embedded default: rank-4 adapters fine-tune the trained digits DiT of `make demo` (frozen) on the
digits turned upside down (data.rotate=180), a style the base never saw. Sampled with the adapters, the model draws
upside-down digits of the requested class; the base alone still draws upright ones. `make demo-lora` runs it.

    python -m jdit.main --config=configs/digits_lora.py --workdir=workdir/digits_lora   # base: workdir/digits
    python -m jdit.main --config=configs/digits_lora.py --workdir=workdir/digits_lora --mode=sample
    python tools/eval_digits.py --samples=workdir/digits_lora/samples.npz --rotate=180
"""
from jdit import config


def get_config(model_family: str = "dit"):
  c = config.recipe("digits", model_family)  # the base's own recipe: same model, data and diffusion
  c.unlock()
  c.init_from = "workdir/digits"  # the frozen base: the run `make demo` trains
  c.lora.update(dict(rank=4,  # alpha = rank: the adapters' output at scale 1
                     # the family's attention and MLP targets, plus the adaLN modulations and the output layer: an
                     # upside-down digit moves pixels within each 2x2 patch, which the output layer lays out
                     # (measured on the notebook's 2-block base: 0.92 of samples read right without them, 0.97 with)
                     targets=(r"^blocks(_\d+)?/(attn|mlp|adaLN_modulation)/", r"^final_layer/")))
  c.data.rotate = 180  # the new style: every digit upside down
  c.optimizer.update(dict(learning_rate=1e-2,  # adapters start at zero and are few: a higher rate than the base's
                          warmup_steps=50))
  c.num_train_steps = 800
  c.checkpoint_every = 400
  c.sample_every = 400
  c.lock()
  return c
