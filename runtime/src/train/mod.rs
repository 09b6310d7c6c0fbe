//! On-device training: LoRA, soft prompts and prefixes learned with the same WGSL kernels
//! that run inference, against a frozen base in any stored format.

pub mod attention;
pub mod frozen;
