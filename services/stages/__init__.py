"""Stage implementations by kind (privimage_core.methods.STAGE_KINDS)."""
from __future__ import annotations

from services.stage_engine import StageImpl
from services.stages import public, release, training

STAGES: dict[str, StageImpl] = {
    "public_index": StageImpl(public.public_index),
    "query_function": StageImpl(public.query_function),
    "semantic_query": StageImpl(public.semantic_query, public.restore_semantic_query),
    "pretrain": StageImpl(training.pretrain, training.restore_pretrain),
    "dp_finetune": StageImpl(training.dp_finetune, training.restore_dp_finetune),
    "synthesize": StageImpl(release.synthesize),
    "evaluate": StageImpl(release.evaluate),
}
