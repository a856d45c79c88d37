"""``dk.losses``: PML's loss classes under PML's names, constructor arguments and defaults.

Switching from PML is one import line: ``from dml_kernels import losses``. Every class also takes the
keyword-only ``backend=`` ("auto" | "reference" | "triton" | "cuda" | "cpu") and ``check_inputs=``.
One module per family (``pair_losses.py``, ``class_losses.py``), mirrored in ``dk.functional`` and in
each backend package.
"""
from .class_losses import ProxyAnchorLoss, ProxyNCALoss, ProxyNCAPlusPlusLoss
from .contrastive_losses import NCALoss, NTXentLoss, SupConLoss
from .contrastive_losses import (CircleLoss, IntraPairVarianceLoss, MarginLoss, SignalToNoiseRatioContrastiveLoss,
                                 ThresholdConsistentMarginLoss, TupletMarginLoss)
from .margin_softmax import (ArcFaceLoss, CosFaceLoss, LargeMarginSoftmaxLoss, NormalizedSoftmaxLoss,
                             P2SGradLoss, SoftTripleLoss, SphereFaceLoss, SubCenterArcFaceLoss)
from .pair_losses import (
    ContrastiveLoss,
    GeneralizedLiftedStructureLoss,
    LiftedStructureLoss,
    MultiSimilarityLoss,
    NPairsLoss,
    TripletMarginLoss,
)
from .wrappers import CrossBatchMemory, MultipleLosses, SelfSupervisedLoss

__all__ = ["MultiSimilarityLoss", "LiftedStructureLoss", "GeneralizedLiftedStructureLoss", "NPairsLoss",
           "ContrastiveLoss", "TripletMarginLoss", "ProxyNCALoss", "ProxyNCAPlusPlusLoss", "ProxyAnchorLoss",
           "CrossBatchMemory", "MultipleLosses", "SelfSupervisedLoss"]
__all__ += ["NTXentLoss", "SupConLoss", "NCALoss"]
__all__ += ["CircleLoss", "TupletMarginLoss", "IntraPairVarianceLoss", "SignalToNoiseRatioContrastiveLoss", "ThresholdConsistentMarginLoss", "MarginLoss"]
__all__ += ["NormalizedSoftmaxLoss", "CosFaceLoss", "ArcFaceLoss", "LargeMarginSoftmaxLoss", "SphereFaceLoss"]
__all__ += ["SubCenterArcFaceLoss", "SoftTripleLoss", "P2SGradLoss"]
from .embedding_losses import AngularLoss, InstanceLoss, ManifoldLoss, VICRegLoss  # noqa: E402
__all__ += ["AngularLoss", "InstanceLoss", "ManifoldLoss", "VICRegLoss"]
from .proxy_gml import ProxyGMLLoss  # noqa: E402
__all__ += ["ProxyGMLLoss"]
from .seed_methods import DensityAdaptivityLoss, LanguageGuidanceLoss  # noqa: E402
__all__ += ["LanguageGuidanceLoss", "DensityAdaptivityLoss"]
# PML's public base classes and mixins, for losses written against PML's API (not in __all__: abstract)
from .base_classes import (BaseLossWrapper, BaseMetricLossFunction, EmbeddingRegularizerMixin,  # noqa: E402,F401
                           GenericPairLoss, WeightMixin, WeightRegularizerMixin)
from .ranking_losses import (DynamicSoftMarginLoss, FastAPLoss, HistogramLoss, PNPLoss,  # noqa: E402
                             RankedListLoss, SmoothAPLoss)
__all__ += ["FastAPLoss", "HistogramLoss", "PNPLoss", "RankedListLoss", "DynamicSoftMarginLoss", "SmoothAPLoss"]
