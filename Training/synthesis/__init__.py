"""The training-data synthesiser: domain-randomised multi-modal brain MRI with lesions.

Separate from the demo generator (:mod:`BrainLesionSAMLib.sample`, whose cases must stay
bit-identical): that one makes one fixed, realistic-looking kind of case for the demo and tests;
this one makes every case different - anatomy, lesions, contrast and acquisition drawn at random
(SynthSeg's recipe: Billot et al., MedIA 2023; sub-clusters after FetalSynthSeg) - so that a model
trained on it cannot learn one generator's look. The only relations kept are those that define
the BraTS sub-regions (``contrast``).

``synthesise_case(seed)`` is deterministic by seed; ``ranges`` holds every range it draws from and
the shifted ranges of the generalisation benchmark. Training uses it through the config switch
``data.synthesis`` (``Training/config.py``).
"""
from .case import SyntheticCase, synthesise_case
from .ranges import SHIFTED, TRAINING, SynthesisRanges

# Bump when a change alters the cases a seed gives (caches of synthetic cases key on it).
SYNTHESISER_VERSION = 3  # 2: thick slices blur with edge mode "nearest" (1 darkened the grid borders);
                         # 3: whole-lesion volumes up to 500 ml (2: 220 ml), every lesion
                         # centred at least half its radius deep

__all__ = ["SHIFTED", "SYNTHESISER_VERSION", "TRAINING", "SynthesisRanges", "SyntheticCase", "synthesise_case"]
