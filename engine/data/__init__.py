"""Layer 2, may import: core, models. Images from any source, bounded and validated.

images (header checks before decode, reduced decode), datasets (built-in sets, folders, validation,
the Dataset that decodes at access time), archive (zip uploads extracted once, atomically), splits
(per-class subsample, stratified split), transforms (the model's eval transform, augmentation),
augment (the augmentation SPEC), augment_preview (its grid of one image), mixing (mixup/cutmix of a batch),
balance (class imbalance: the ratio, class weights, the balanced sampler).
"""
