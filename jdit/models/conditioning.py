"""The conditioning contract between data, objectives, samplers and model families.

A batch is a dict of host arrays with documented keys:
    image   (B, H, W, C) float32: the model input, pixels in [-1, 1] or scaled VAE latents
    label   (B,) int32: class labels (class-conditional families)
    context (B, L, D) float32: text-encoder tokens (text families, jdit.models.conditioning.TextConditional)
    pooled  (B, P) float32: the pooled text vector
    null_context, null_pooled: the same for the empty prompt (sampling batches: classifier-free guidance)
A model reads its conditioning as `cond = model.condition(batch)`, the sub-dict of the keys it declares in
`condition_keys`, through `model.forward(x, t, cond, train)`; for classifier-free guidance it says how to build
the unconditional half, `model.null_condition(cond)` (the null class for labels, the empty prompt for text).
Losses, guidance and samplers pass `cond` through without naming any key.
"""
import jax.numpy as jnp


class ClassConditional:
  """The contract for families conditioned on class labels (fields input_size, in_channels, num_classes,
  class_dropout_prob; their __call__ is (x, t, y=None, train=False)): key "label", the null class num_classes,
  present when class_dropout_prob > 0."""

  @property
  def input_hw(self) -> tuple[int, int]:
    """The native input (H, W) from input_size (an int or (H, W))."""
    size = self.input_size
    return (size, size) if isinstance(size, int) else tuple(size)

  def dummy_inputs(self, batch_size: int = 1) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray | None]:
    """(x, t, y) of the native input shape, for init and shape inference."""
    x = jnp.zeros((batch_size, *self.input_hw, self.in_channels), jnp.float32)
    y = jnp.zeros((batch_size,), jnp.int32) if self.num_classes else None
    return x, jnp.zeros((batch_size,), jnp.float32), y

  @property
  def condition_keys(self) -> tuple[str, ...]:
    return ("label",) if self.num_classes else ()

  @property
  def supports_guidance(self) -> bool:
    """True when null_condition exists: the model was built with a null class for classifier-free guidance."""
    return bool(self.num_classes) and self.class_dropout_prob > 0

  def condition(self, batch: dict) -> dict:
    return {key: batch[key] for key in self.condition_keys}

  def null_condition(self, cond: dict) -> dict:
    return {"label": jnp.full_like(cond["label"], self.num_classes)}

  def forward(self, x, t, cond: dict, train: bool = False):
    """__call__ with the conditioning dict: model.apply(variables, x, t, cond, method="forward")."""
    return self(x, t, cond.get("label"), train=train)

  def dummy_batch(self, batch_size: int = 1) -> dict:
    """A batch of the native input shape (zeros), as the data pipeline delivers it."""
    x, _, y = self.dummy_inputs(batch_size)
    return {"image": x, **({"label": y} if self.num_classes else {})}


def text_conditioned(model) -> bool:
  """Whether `model` follows the text contract (frozen-encoder embeddings or its own encoder's token ids)."""
  return bool({"context", "tokens"} & set(model.condition_keys))


class TextConditional:
  """The contract for families conditioned on text (fields text_length, joint_attention_dim,
  pooled_projection_dim, text_vocab_size, text_layers, text_heads, text_eos_id; __call__(x, t, context, pooled, ...,
  tokens=None)). With text_vocab_size = 0
  the model reads frozen-encoder embeddings, keys context and pooled; otherwise it trains its own text encoder on
  token ids, key tokens. Caption dropout happens in the data pipeline (the empty prompt replaces a caption, as
  SD3 trains); guidance reads the empty prompt from null_context / null_pooled, or null_tokens, which sampling
  batches carry."""
  supports_guidance = True

  @property
  def hidden_size(self) -> int:
    """The transformer's width (fields num_heads x head_dim)."""
    return self.num_heads * self.head_dim

  @property
  def size_multiple(self) -> int:
    """Input sides must be multiples of the patch (field patch_size)."""
    return self.patch_size

  @property
  def input_hw(self) -> tuple[int, int]:
    """The native latent (H, W) from input_size (an int or (H, W))."""
    size = self.input_size
    return (size, size) if isinstance(size, int) else tuple(size)

  @property
  def condition_keys(self) -> tuple[str, ...]:
    return ("tokens",) if self.text_vocab_size else ("context", "pooled")

  @property
  def null_keys(self) -> dict:
    """Each condition key -> the key of its empty-prompt counterpart."""
    return {key: f"null_{key}" for key in self.condition_keys}

  def condition(self, batch: dict) -> dict:
    """The condition keys, and their empty-prompt counterparts when the batch has them."""
    return {key: batch[key] for key in (*self.condition_keys, *self.null_keys.values()) if key in batch}

  def null_condition(self, cond: dict) -> dict:
    missing = [k for k in self.null_keys.values() if k not in cond]
    if missing:
      raise ValueError(f"classifier-free guidance of a text model needs the empty prompt "
                       f"({', '.join(missing)}) in the conditioning")
    return {**cond, **{key: cond[null] for key, null in self.null_keys.items()}}

  def forward(self, x, t, cond: dict, train: bool = False):
    """__call__ with the conditioning dict (`train` changes nothing: no dropout inside the model)."""
    del train
    if self.text_vocab_size:
      return self(x, t, tokens=cond["tokens"])
    return self(x, t, cond["context"], cond["pooled"])

  def dummy_batch(self, batch_size: int = 1) -> dict:
    """A training batch of the native input shape and text_length tokens (zeros), as the pipeline delivers."""
    x = jnp.zeros((batch_size, *self.input_hw, self.in_channels), jnp.float32)
    if self.text_vocab_size:
      return {"image": x, "tokens": jnp.zeros((batch_size, self.text_length), jnp.int32)}
    return {"image": x, "context": jnp.zeros((batch_size, self.text_length, self.joint_attention_dim), jnp.float32),
            "pooled": jnp.zeros((batch_size, self.pooled_projection_dim), jnp.float32)}

  def encode_text(self, tokens: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The model's own text encoder (text_vocab_size > 0; called from the compact __call__): token ids (B, L) ->
    context (B, L, joint_attention_dim), pooled (B, pooled_projection_dim). CLIP's architecture, width
    joint_attention_dim, text_layers x text_heads, the pooled feature at text_eos_id, projected."""
    from jdit.text.clip import CLIPTextEncoder
    out = CLIPTextEncoder(vocab_size=self.text_vocab_size, hidden_size=self.joint_attention_dim,
                          intermediate_size=4 * self.joint_attention_dim, num_layers=self.text_layers,
                          num_heads=self.text_heads, max_positions=self.text_length, hidden_act="gelu",
                          eos_token_id=self.text_eos_id, projection_dim=self.pooled_projection_dim,
                          dtype=self.dtype, scan_layers=False, name="text_encoder")(tokens)
    return out["last_hidden_state"], out["pooled"]
