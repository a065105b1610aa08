"""Files in, one :class:`~hrf_batch.io.volume.Volume` out: discovery, readers, writers, study labels.

Pure numpy and dataclasses; nothing here imports torch or the database."""
