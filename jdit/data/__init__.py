"""Input pipelines: sources (digits, tfds array_record, image folders) and grain iterators."""
