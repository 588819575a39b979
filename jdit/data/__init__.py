"""Input data. Imports run one way: records <- sources; transforms <- pipeline; records, transforms <- writers.

    records     on-disk record formats and shard names (image records, cached-latent records)
    sources     readers: digits, tfds array_record, image-record folders, latent caches
    transforms  record -> model input (crop, flip, latent draw and scaling), host batch conversion
    pipeline    grain: deterministic shuffling, host sharding, batching, checkpointable iterators
    writers     image folder -> image records; dataset -> cached latents
"""
