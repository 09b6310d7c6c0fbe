//! The PEFT directory layout shared by every adapter kind: `adapter_config.json` and
//! `adapter_model.safetensors`, each written atomically, with the base model's identity
//! recorded so that an adapter refuses another base.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::Model;
use crate::util::write_atomic;

/// A parsed `adapter_config.json`.
pub struct PeftConfig {
    /// The file (for messages).
    pub path: PathBuf,
    /// Its JSON.
    pub json: Value,
}

impl PeftConfig {
    /// Reads `dir/adapter_config.json`.
    pub fn read(dir: &Path) -> Result<PeftConfig> {
        let path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let json = serde_json::from_str(&text)
            .map_err(|e| Error::format(Some(&path), format!("invalid JSON: {e}")))?;
        Ok(PeftConfig { path, json })
    }

    /// A non-null field.
    pub fn get(&self, k: &str) -> Option<&Value> {
        self.json.get(k).filter(|x| !x.is_null())
    }

    /// `peft_type` (upper case, e.g. `LORA`), when present.
    pub fn peft_type(&self) -> Option<&str> {
        self.get("peft_type").and_then(|t| t.as_str())
    }

    /// A required unsigned field.
    pub fn usize(&self, k: &str) -> Result<usize> {
        self.get(k)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .ok_or_else(|| self.error(format!("missing or invalid {k}")))
    }

    /// A format error naming this file.
    pub fn error(&self, d: impl Into<String>) -> Error {
        Error::format(Some(&self.path), d)
    }

    /// The recorded base identity, checked against `model`.
    pub fn check_base(&self, dir: &Path, model: &Model) -> Result<Option<u64>> {
        let id = self
            .get("ember_base_model_identity")
            .and_then(|s| s.as_str())
            .and_then(|s| u64::from_str_radix(s, 16).ok());
        if let Some(id) = id {
            if id != model.identity {
                return Err(Error::InvalidArgument(format!(
                    "{}: the adapter was made for another base model (identity {id:016x}, this model is {:016x})",
                    dir.display(),
                    model.identity
                )));
            }
        }
        Ok(id)
    }

    /// `base_model_name_or_path`, or empty.
    pub fn base_name(&self) -> String {
        self.get("base_model_name_or_path")
            .and_then(|s| s.as_str())
            .unwrap_or("")
            .to_string()
    }
}

/// The fields every config Ember writes carries.
pub fn common_fields(model: &Model) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("task_type".into(), "CAUSAL_LM".into());
    m.insert(
        "base_model_name_or_path".into(),
        model.config.name.clone().into(),
    );
    m.insert(
        "ember_base_model_identity".into(),
        format!("{:016x}", model.identity).into(),
    );
    m.insert("ember_version".into(), crate::VERSION.into());
    m
}

/// Writes `adapter_model.safetensors` (f32 tensors, PEFT's metadata) and
/// `adapter_config.json` into `dir`, each atomically (the tensors first, so a config never
/// describes tensors that are not there).
pub fn save(dir: &Path, tensors: &[(String, Vec<usize>, &[f32])], config: &Value) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Internal(format!("safetensors view {n}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let st = safetensors::serialize(views, Some(meta))
        .map_err(|e| Error::Internal(format!("safetensors: {e}")))?;
    write_atomic(&dir.join("adapter_model.safetensors"), &st)?;
    let text = serde_json::to_string_pretty(config)
        .map_err(|e| Error::Internal(format!("adapter config: {e}")))?;
    write_atomic(&dir.join("adapter_config.json"), text.as_bytes())
}

/// Reads `dir/adapter_model.safetensors`.
pub fn read_tensors(dir: &Path) -> Result<(PathBuf, Vec<u8>)> {
    let path = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&path).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })?;
    Ok((path, bytes))
}

/// Tensor `name` as f32 (from F32, F16 or BF16) with its shape; `None` when absent.
pub fn read_f32(
    st: &safetensors::SafeTensors<'_>,
    name: &str,
    path: &Path,
) -> Result<Option<(Vec<f32>, Vec<usize>)>> {
    let t = match st.tensor(name) {
        Ok(t) => t,
        Err(safetensors::SafeTensorError::TensorNotFound(_)) => return Ok(None),
        Err(e) => return Err(Error::format(Some(path), format!("{name}: {e}"))),
    };
    let b = t.data();
    let v = match t.dtype() {
        safetensors::Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        safetensors::Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        safetensors::Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(Error::Unsupported(format!(
                "{}: {name} has dtype {other:?}",
                path.display()
            )))
        }
    };
    Ok(Some((v, t.shape().to_vec())))
}
