"""Input data: one module per source behind the registry in sources.py, and what the sources share.

    records      on-disk record formats and shard names (image records, cached-latent records, image sizes)
    readers      array_record shards as random-access sources, image sizes, the missing-dataset error
    buckets      aspect-ratio bucket tables, assignment, the (seed, step) -> bucket batch schedule
    transforms   record -> model input (crop, flip, latent draw and scaling), host batch conversion
    checks       a dataset against the model that trains on it (shapes, caches, buckets)
    sources      the registry: config.data.source -> its module (open, transform, check, sample conditions)
    digits, digit_scenes, tfds, folder, latents, captioned   the sources
    text_cache   the text-embedding cache of a captioned dataset (written by tools/encode_text.py)
    pipeline     grain: deterministic shuffling, host sharding, batching (bucketed or not), checkpointable iterators
    writers      image folder -> image records and sizes; dataset -> cached latents
"""
