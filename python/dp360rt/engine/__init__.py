"""The engine: :class:`~.pipeline.Pipeline` (portrait -> back view -> 32 views), what a generation
returns (:mod:`.generation`), edge mode's model swapping (:mod:`.offload`) and building a pipeline
from command-line options (:mod:`.pipeline_args`)."""
