"""Reads the parts of a SentencePiece model file (spiece.model, a ModelProto in protobuf wire format) a T5
tokenizer needs, without the sentencepiece or protobuf packages:

    pieces                 [(piece, score)] in id order      ModelProto.pieces = 1 {piece = 1, score = 2}
    precompiled_charsmap   the normalization table           ModelProto.normalizer_spec = 3 {charsmap = 2}
"""
import struct


def _varint(data: bytes, pos: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    if pos >= len(data):
      raise ValueError("truncated varint")
    byte = data[pos]
    value |= (byte & 0x7F) << shift
    pos, shift = pos + 1, shift + 7
    if not byte & 0x80:
      return value, pos


def fields(data: bytes):
  """Yields (field number, wire type, value) of one message: ints for varints, bytes for length-delimited
  fields, raw bytes for fixed32/fixed64."""
  pos = 0
  while pos < len(data):
    key, pos = _varint(data, pos)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _varint(data, pos)
    elif wire == 2:
      size, pos = _varint(data, pos)
      value, pos = data[pos:pos + size], pos + size
      if pos > len(data):
        raise ValueError(f"field {number} runs past the end")
    elif wire in (1, 5):
      size = 8 if wire == 1 else 4
      value, pos = data[pos:pos + size], pos + size
    else:
      raise ValueError(f"unsupported wire type {wire} (field {number})")
    yield number, wire, value


def read(path: str) -> dict:
  """{"pieces": [(piece, score)], "precompiled_charsmap": bytes or None} of a SentencePiece model file."""
  with open(path, "rb") as f:
    data = f.read()
  pieces, charsmap = [], None
  try:
    for number, wire, value in fields(data):
      if number == 1 and wire == 2:
        piece, score = "", 0.0
        for n, w, v in fields(value):
          if n == 1 and w == 2:
            piece = v.decode("utf-8")
          elif n == 2 and w == 5:
            score = struct.unpack("<f", v)[0]
        pieces.append((piece, score))
      elif number == 3 and wire == 2:
        charsmap = next((v for n, w, v in fields(value) if n == 2 and w == 2), None) or None
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not a SentencePiece model ({e})") from e
  if not pieces:
    raise ValueError(f"{path}: not a SentencePiece model (no pieces)")
  return {"pieces": pieces, "precompiled_charsmap": charsmap}
