"""X-adapter (Zhang et al., arXiv 2305.07358; docs/methods/xadapter.md#design): CLIP knowledge plugged into a frozen
BERT / RoBERTa.

Read :mod:`xmx.methods.xadapter.expert` first: the expert block's equations, its placement and PEFT-style injection,
and the V-/T-expert inputs. :mod:`~xmx.methods.xadapter.glue` holds the GLUE metrics, :mod:`~xmx.methods.xadapter.module`
the runs (MLM pre-training, colour probe, GLUE). MLM masking and the colour probe's prompts are data
(:mod:`xmx.data.mlm`, :mod:`xmx.data.color_probe`); the retrieval index is a feature-store view
(:mod:`xmx.features.retrieval`).
"""

from xmx.methods.xadapter.expert import (ClassificationHead, ExpertBlock, XAdapter, glue_loss, mlm_loss,
                                         resolve_placement, t_expert_inputs, v_expert_inputs)
from xmx.methods.xadapter.glue import GlueMetrics
from xmx.methods.xadapter.module import (XAdapterColorProbe, XAdapterGlue, XAdapterMLM, XAdapterRun, linear_warmup,
                                         mlm_head)

__all__ = ["ClassificationHead", "ExpertBlock", "GlueMetrics", "XAdapter", "XAdapterColorProbe", "XAdapterGlue",
           "XAdapterMLM", "XAdapterRun", "glue_loss", "linear_warmup", "mlm_head", "mlm_loss", "resolve_placement",
           "t_expert_inputs", "v_expert_inputs"]
