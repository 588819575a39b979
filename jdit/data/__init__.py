"""Input data. Imports run one way: records <- sources; buckets, sources, transforms <- pipeline; buckets, records,
sources, transforms <- writers.

    records     on-disk record formats and shard names (image records, cached-latent records, image sizes)
    sources     readers: digits, tfds array_record, image-record folders, latent caches; image sizes
    buckets     aspect-ratio bucket tables, assignment, the (seed, step) -> bucket batch schedule
    transforms  record -> model input (crop, flip, latent draw and scaling), host batch conversion
    pipeline    grain: deterministic shuffling, host sharding, batching (bucketed or not), checkpointable iterators
    writers     image folder -> image records and sizes; dataset -> cached latents
"""
