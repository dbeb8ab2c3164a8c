"""The batch contract: every key a vdiff batch may hold, documented in this one module.

A batch is a ``dict``. Data modules produce it, LightningModules and callbacks read it.

========================  =====================================  ==========================================
key                       type / shape                           meaning
========================  =====================================  ==========================================
``video``                 float ``(B, T, C, H, W)`` in [-1, 1]   RGB clip (video shards)
``latents``               float ``(B, T, c, h, w)``              unscaled latents sampled from the stored
                                                                 posterior (latent shards)
``latents_mean``          float ``(B, T, c, h, w)``              posterior mean (latent shards)
``latents_std``           float ``(B, T, c, h, w)``              posterior std (latent shards)
``first_frame``           float ``(B, C, H, W)`` in [-1, 1]      the clean first frame of the clip
``image_embed``           float ``(B, D)``                       precomputed image embedding, if stored
``fps``                   float ``(B,)``                         frame rate of the clip as sampled
``motion_score``          float ``(B,)``                         curation motion score of the clip (the json's
                                                                 ``extra["motion_score"]``), NaN where unknown
``frame_indices``         long ``(B, T)``                        source-video frame index of every frame
``key``                   ``list[str]``                          sample key (unique within a shard set)
``source``                ``list[str]``                          which data source the sample came from
``actions``               ``dict[str, Tensor]``                  per-frame actions, see below
========================  =====================================  ==========================================

``actions`` holds, for each key of :data:`vdiff.data.schema.ACTION_SHAPES`, a float tensor
``(B, T, *shape)`` (``command`` is long ``(B, T)``) and a bool ``<key>_valid`` ``(B, T)``. Invalid
entries are zero and must be treated as unconditional by a model. Every action key is always
present, so batches from sources with and without actions collate together.

``motion_score`` is the mean optical-flow magnitude that ``vdiff data shards`` curation stores per clip
(:func:`vdiff.data.convert.curation.motion_score`; units in the json's ``extra["motion_fps"]`` and
``extra["motion_size"]``: pixels at a ``motion_size``-pixel shorter side per ``1 / motion_fps`` seconds). It is
the score of the whole stored clip (or, for latent shards, of the video clip the sample was encoded from), not of
the frames sampled. Samples without a score (synthetic data, converters that do not score, ``--no-motion``) give
NaN, so sources with and without scores collate together; ``vdiff data motion-buckets`` fits SVD's
``motion_bucket_id`` map to the scores of a shard set.
"""

from __future__ import annotations

from vdiff.models.actions import valid_key  # noqa: F401  re-exported: ``valid_key("speed") == "speed_valid"``

VIDEO = "video"
LATENTS = "latents"
LATENTS_MEAN = "latents_mean"
LATENTS_STD = "latents_std"
FIRST_FRAME = "first_frame"
IMAGE_EMBED = "image_embed"
FPS = "fps"
MOTION_SCORE = "motion_score"
FRAME_INDICES = "frame_indices"
KEY = "key"
SOURCE = "source"
ACTIONS = "actions"

