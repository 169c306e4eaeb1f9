//! Reading and writing Hugging Face safetensors checkpoints.
//!
//! [`Checkpoint::open`] maps `model.safetensors`, or every shard named by
//! `model.safetensors.index.json`, into memory and indexes the tensors by name (the `safetensors`
//! crate reads and checks each header; no tensor data is read until asked for). [`WeightLoader`]
//! hands tensors to the model code by Hugging Face name, converting dtype and device, and collects
//! the names that were asked for but absent (MISSING), present but never asked for (UNEXPECTED) or
//! of the wrong shape, so a mismatch between checkpoint and architecture becomes one error that
//! lists them all.
//!
//! [`save_safetensors`] writes tensors with `{"format": "pt"}` metadata, as transformers does.
#![allow(unsafe_code)] // memory-mapping the checkpoint files

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensorError, SafeTensors};
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<i64>,
    /// Byte range of the data in the file.
    begin: usize,
    end: usize,
}

/// `model.safetensors.index.json`: which shard holds each tensor.
#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

/// A (possibly sharded) safetensors checkpoint, memory-mapped.
pub struct Checkpoint {
    files: Vec<(PathBuf, Mmap)>,
    entries: BTreeMap<String, Entry>,
}

fn weights_err(msg: impl Into<String>) -> Error {
    Error::Weights(msg.into())
}

impl Checkpoint {
    /// Opens the weights of a Hugging Face model folder: `model.safetensors`, or the shards listed
    /// in `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.is_file() {
            return Self::open_files(&[single]);
        }
        if index.is_file() {
            let text = std::fs::read_to_string(&index)
                .map_err(|e| Error::io(format!("reading {}", index.display()), e))?;
            let index_err = |e: serde_json::Error| {
                let what = if e.is_data() {
                    "not a shard index"
                } else {
                    "not valid JSON"
                };
                weights_err(format!("{}: {what}: {e}", index.display()))
            };
            let map = serde_json::from_str::<ShardIndex>(&text)
                .map_err(index_err)?
                .weight_map;
            let mut shards = BTreeSet::new();
            for file in map.values() {
                if file.contains('/') || file.contains("..") {
                    return Err(weights_err(format!(
                        "{}: shard name {file:?} must be a plain file name",
                        index.display()
                    )));
                }
                shards.insert(file.to_string());
            }
            if shards.is_empty() {
                return Err(weights_err(format!(
                    "{}: `weight_map` is empty",
                    index.display()
                )));
            }
            let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
            return Self::open_files(&paths);
        }
        let mut hint = String::new();
        if dir.join("pytorch_model.bin").exists()
            || dir.join("pytorch_model.bin.index.json").exists()
        {
            hint = " (this model ships only pickle `pytorch_model.bin` weights; convert them to safetensors first)".into();
        }
        Err(weights_err(format!(
            "no model.safetensors or model.safetensors.index.json in {}{hint}",
            dir.display()
        )))
    }

    /// Opens the given safetensors files as one checkpoint (a name in two files is an error).
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut entries = BTreeMap::new();
        for (i, path) in paths.iter().enumerate() {
            let f = File::open(path)
                .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
            // SAFETY: the file is opened read-only and tuna does not modify checkpoints while a job
            // reads them; a concurrent truncation by another process would be a user error.
            let mmap = unsafe { Mmap::map(&f) }
                .map_err(|e| Error::io(format!("mapping {}", path.display()), e))?;
            parse_header(&mmap, i, path, &mut entries)?;
            files.push((path.clone(), mmap));
        }
        Ok(Checkpoint { files, entries })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn shape(&self, name: &str) -> Option<&[i64]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// The tensor `name`, converted to `kind` on `device` (a fresh tensor, not requiring grad).
    pub fn tensor(&self, name: &str, kind: Kind, device: Device) -> Result<Tensor> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| weights_err(format!("tensor {name} is not in the checkpoint")))?;
        let src_kind = kind_of(e.dtype).ok_or_else(|| {
            weights_err(format!(
                "tensor {name} has dtype {:?} which tuna cannot read",
                e.dtype
            ))
        })?;
        let (path, mmap) = &self.files[e.file];
        let data = &mmap[e.begin..e.end];
        let t = Tensor::f_from_data_size(data, &e.shape, src_kind)
            .map_err(|err| weights_err(format!("{}: reading {name}: {err}", path.display())))?;
        let t = if device != Device::Cpu {
            t.f_to_device(device)?
        } else {
            t
        };
        Ok(if t.kind() != kind {
            t.f_to_kind(kind)?
        } else {
            t
        })
    }

    /// The safetensors dtype of a tensor.
    pub fn dtype(&self, name: &str) -> Option<Dtype> {
        self.entries.get(name).map(|e| e.dtype)
    }
}

/// Indexes the tensors of one file; the `safetensors` crate reads the header and checks that the
/// data offsets tile the file and fit each tensor's shape and dtype.
fn parse_header(
    mmap: &Mmap,
    file: usize,
    path: &Path,
    entries: &mut BTreeMap<String, Entry>,
) -> Result<()> {
    let (n, metadata) = SafeTensors::read_metadata(mmap).map_err(|e| {
        weights_err(format!(
            "{} is not a valid safetensors file: {}",
            path.display(),
            header_problem(&e)
        ))
    })?;
    let data_start = 8 + n;
    for (name, info) in metadata.tensors() {
        if entries.contains_key(&name) {
            return Err(weights_err(format!(
                "tensor {name} appears in two checkpoint files"
            )));
        }
        let (begin, end) = info.data_offsets;
        entries.insert(
            name,
            Entry {
                file,
                dtype: info.dtype,
                shape: info.shape.iter().map(|&d| d as i64).collect(),
                begin: data_start + begin,
                end: data_start + end,
            },
        );
    }
    Ok(())
}

fn header_problem(e: &SafeTensorError) -> String {
    match e {
        SafeTensorError::HeaderTooSmall => "shorter than its 8-byte header length".into(),
        SafeTensorError::HeaderTooLarge | SafeTensorError::InvalidHeaderLength => {
            "its header length exceeds the file".into()
        }
        SafeTensorError::InvalidHeader
        | SafeTensorError::InvalidHeaderStart
        | SafeTensorError::InvalidHeaderDeserialization => {
            "its header is not a JSON table of tensors with known dtypes".into()
        }
        SafeTensorError::InvalidOffset(name) => {
            format!("{name}: data offsets do not follow the previous tensor's")
        }
        SafeTensorError::TensorInvalidInfo | SafeTensorError::ValidationOverflow => {
            "a tensor's data offsets do not fit its shape".into()
        }
        SafeTensorError::MetadataIncompleteBuffer => {
            "its tensors do not cover the file's data (truncated?)".into()
        }
        other => other.to_string(),
    }
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

fn dtype_of(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        other => {
            return Err(weights_err(format!(
                "cannot save tensors of kind {other:?}"
            )))
        }
    })
}

/// The dtype name config.json uses for a kind ("float32", "bfloat16", "float16").
pub fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        Kind::Double => "float64",
        _ => "float32",
    }
}

/// The kind for a config.json dtype name; None for names tuna does not store weights in.
pub fn kind_from_name(name: &str) -> Option<Kind> {
    match name {
        "float32" | "float" => Some(Kind::Float),
        "bfloat16" => Some(Kind::BFloat16),
        "float16" | "half" => Some(Kind::Half),
        _ => None,
    }
}

/// Copies a tensor's data to host bytes (contiguous, CPU).
fn host_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.f_detach()?.f_to_device(Device::Cpu)?.f_contiguous()?;
    let numel = t.numel();
    let mut data = vec![0u8; numel * t.kind().elt_size_in_bytes()];
    t.f_copy_data_u8(&mut data, numel)?;
    Ok(data)
}

/// Writes a safetensors file with `{"format": "pt"}` metadata, one tensor at a time: the header
/// comes from `items` (name, kind, shape) and `get(i)` produces tensor `i` only when it is
/// written, so peak memory is one tensor (host and device), not the whole model.
pub fn save_safetensors_lazy(
    path: &Path,
    items: &[(String, Kind, Vec<i64>)],
    mut get: impl FnMut(usize) -> Result<Tensor>,
) -> Result<()> {
    use std::io::Write;
    let werr = |e: std::io::Error| Error::io(format!("writing {}", path.display()), e);
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0usize;
    let mut sizes = Vec::with_capacity(items.len());
    for (name, kind, shape) in items {
        let n = shape.iter().product::<i64>() as usize * kind.elt_size_in_bytes();
        let dtype = format!("{:?}", dtype_of(*kind)?);
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}),
        );
        sizes.push(n);
        offset += n;
    }
    let mut text = serde_json::to_string(&header).map_err(|e| Error::Other(e.into()))?;
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let file = File::create(path).map_err(werr)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 22, file);
    w.write_all(&(text.len() as u64).to_le_bytes())
        .map_err(werr)?;
    w.write_all(text.as_bytes()).map_err(werr)?;
    for (i, (name, kind, shape)) in items.iter().enumerate() {
        let t = get(i)?;
        if t.kind() != *kind || t.size() != *shape {
            return Err(Error::Weights(format!(
                "saving {name}: produced {:?} {:?}, announced {kind:?} {shape:?}",
                t.kind(),
                t.size()
            )));
        }
        let bytes = host_bytes(&t)?;
        debug_assert_eq!(bytes.len(), sizes[i]);
        w.write_all(&bytes).map_err(werr)?;
    }
    w.flush().map_err(werr)?;
    Ok(())
}

/// Writes `tensors` as one safetensors file with `{"format": "pt"}` metadata.
pub fn save_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let items: Vec<(String, Kind, Vec<i64>)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.kind(), t.size()))
        .collect();
    save_safetensors_lazy(path, &items, |i| Ok(tensors[i].1.shallow_clone()))
}

/// Reads every tensor of one safetensors file (CPU, file dtype). For small files: references,
/// adapters, resume state.
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let ck = Checkpoint::open_files(&[path.to_path_buf()])?;
    let mut out = BTreeMap::new();
    for name in ck.names() {
        let kind = ck.dtype(name).and_then(kind_of).unwrap_or(Kind::Float);
        out.insert(name.to_string(), ck.tensor(name, kind, Device::Cpu)?);
    }
    Ok(out)
}

/// Hands checkpoint tensors to model code and collects every mismatch.
///
/// Base-model tensors are asked for by their name inside the base model (`h.0.attn.c_attn.weight`)
/// and found whether or not the checkpoint prefixes them with the architecture's base prefix
/// (`transformer.`, `model.`, `bert.`), so a `*ForCausalLM`, `*ForSequenceClassification` or bare
/// `*Model` checkpoint all load.
pub struct WeightLoader<'a> {
    ckpt: &'a Checkpoint,
    prefix: String,
    /// The architecture's older spelling of a base tensor name, if any.
    legacy: fn(&str) -> Option<String>,
    device: Device,
    used: BTreeSet<String>,
    missing: Vec<String>,
    bad_shape: Vec<String>,
    /// Human-readable notes for the load report (initialised heads, ignored tensors).
    pub notes: Vec<String>,
}

impl<'a> WeightLoader<'a> {
    pub fn new(
        ckpt: &'a Checkpoint,
        base_prefix: &str,
        legacy: fn(&str) -> Option<String>,
        device: Device,
    ) -> Self {
        WeightLoader {
            ckpt,
            prefix: base_prefix.to_string(),
            legacy,
            device,
            used: BTreeSet::new(),
            missing: Vec::new(),
            bad_shape: Vec::new(),
            notes: Vec::new(),
        }
    }

    fn resolve(&self, rel: &str) -> Option<String> {
        let mut candidates = vec![format!("{}.{rel}", self.prefix), rel.to_string()];
        if let Some(old) = (self.legacy)(rel) {
            candidates.push(format!("{}.{old}", self.prefix));
            candidates.push(old);
        }
        candidates.into_iter().find(|c| self.ckpt.contains(c))
    }

    /// Whether the checkpoint has base tensor `rel` (prefixed or not).
    pub fn has_base(&self, rel: &str) -> bool {
        self.resolve(rel).is_some()
    }

    /// Base-model tensor `rel` of shape `shape` as `kind`. A missing or misshapen tensor is
    /// recorded (the error comes from [`WeightLoader::finish`]) and zeros are returned so that
    /// loading goes on and every problem is reported at once.
    pub fn base(&mut self, rel: &str, shape: &[i64], kind: Kind) -> Result<Tensor> {
        let full = format!("{}.{rel}", self.prefix);
        match self.resolve(rel) {
            None => {
                self.missing.push(full);
                Ok(Tensor::f_zeros(shape, (kind, self.device))?)
            }
            Some(name) => {
                self.used.insert(name.clone());
                let got = self.ckpt.shape(&name).unwrap_or(&[]);
                if got != shape {
                    self.bad_shape
                        .push(format!("{name} (checkpoint {got:?}, model {shape:?})"));
                    return Ok(Tensor::f_zeros(shape, (kind, self.device))?);
                }
                self.ckpt.tensor(&name, kind, self.device)
            }
        }
    }

    /// Optional tensor outside the base model (an output or classification head). None when
    /// absent or when its shape differs (then a note says it will be initialised afresh).
    pub fn head(&mut self, name: &str, shape: &[i64], kind: Kind) -> Result<Option<Tensor>> {
        if !self.ckpt.contains(name) {
            return Ok(None);
        }
        self.used.insert(name.to_string());
        let got = self.ckpt.shape(name).unwrap_or(&[]);
        if got != shape {
            self.notes.push(format!(
                "{name} in the checkpoint has shape {got:?}, the task needs {shape:?}: initialised afresh"
            ));
            return Ok(None);
        }
        Ok(Some(self.ckpt.tensor(name, kind, self.device)?))
    }

    /// Required tensor outside the base model (e.g. an untied `lm_head.weight`); recorded as
    /// missing or misshapen like [`WeightLoader::base`].
    pub fn require(&mut self, name: &str, shape: &[i64], kind: Kind) -> Result<Tensor> {
        if !self.ckpt.contains(name) {
            self.missing.push(name.to_string());
            return Ok(Tensor::f_zeros(shape, (kind, self.device))?);
        }
        self.used.insert(name.to_string());
        let got = self.ckpt.shape(name).unwrap_or(&[]);
        if got != shape {
            self.bad_shape
                .push(format!("{name} (checkpoint {got:?}, model {shape:?})"));
            return Ok(Tensor::f_zeros(shape, (kind, self.device))?);
        }
        self.ckpt.tensor(name, kind, self.device)
    }

    /// Marks a checkpoint tensor as deliberately unused (with a note).
    pub fn ignore(&mut self, name: &str, why: &str) {
        if self.ckpt.contains(name) && self.used.insert(name.to_string()) {
            self.notes.push(format!("{name} not used: {why}"));
        }
    }

    /// Fails with every MISSING, UNEXPECTED and misshapen tensor. `benign` names checkpoint
    /// tensors that may be left unused silently (non-parameter buffers such as GPT-2's
    /// `attn.bias`); `other_heads` names those left unused with a note (heads of other tasks).
    pub fn finish(
        mut self,
        benign: impl Fn(&str) -> bool,
        other_heads: impl Fn(&str) -> bool,
    ) -> Result<Vec<String>> {
        let mut unexpected = Vec::new();
        let mut ignored_heads = Vec::new();
        for name in self.ckpt.names() {
            if self.used.contains(name) || benign(name) {
                continue;
            }
            if other_heads(name) {
                ignored_heads.push(name.to_string());
            } else {
                unexpected.push(name.to_string());
            }
        }
        if !ignored_heads.is_empty() {
            self.notes.push(format!(
                "not used (head of another task): {}",
                ignored_heads.join(", ")
            ));
        }
        if self.missing.is_empty() && unexpected.is_empty() && self.bad_shape.is_empty() {
            return Ok(self.notes);
        }
        let mut parts = Vec::new();
        let list = |v: &[String]| {
            const MAX: usize = 40;
            let mut s = v.iter().take(MAX).cloned().collect::<Vec<_>>().join(", ");
            if v.len() > MAX {
                s.push_str(&format!(", ... ({} more)", v.len() - MAX));
            }
            s
        };
        if !self.missing.is_empty() {
            parts.push(format!(
                "MISSING from the checkpoint ({}): {}",
                self.missing.len(),
                list(&self.missing)
            ));
        }
        if !unexpected.is_empty() {
            parts.push(format!(
                "UNEXPECTED in the checkpoint ({}): {}",
                unexpected.len(),
                list(&unexpected)
            ));
        }
        if !self.bad_shape.is_empty() {
            parts.push(format!(
                "WRONG SHAPE ({}): {}",
                self.bad_shape.len(),
                list(&self.bad_shape)
            ));
        }
        Err(weights_err(parts.join("; ")))
    }
}
