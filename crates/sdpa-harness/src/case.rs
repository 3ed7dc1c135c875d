//! Case files (DESIGN.md, "Case files and goldens"): a safetensors file with tensors
//! `q`, `k`, `v`, optional `attn_mask` (bool or additive), optional expected results
//! (`out`, `out_f64`, `lse`, `lse_f64`, ...), and the options as `__metadata__` strings:
//! `is_causal`, `causal` (`none`/`top_left`/`bottom_right`), `dropout_p`, `seed`,
//! `offset`, `scale`, `enable_gqa`. Files written by `safetensors.torch.save_file`
//! replay as they are.

use crate::error::{HarnessError, Result};
use crate::tensor::Tensor;
use sdpa_core::{Causal, Dropout, SdpaOptions};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;

/// One SDPA call with its inputs, options and any stored results.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    /// `[B, Hq, L, E]`.
    pub q: Tensor,
    /// `[B, Hkv, S, E]`.
    pub k: Tensor,
    /// `[B, Hkv, S, Ev]`.
    pub v: Tensor,
    /// Bool or additive mask, broadcastable to `[B, Hq, L, S]`.
    pub attn_mask: Option<Tensor>,
    /// Causal, dropout, scale, GQA.
    pub options: SdpaOptions,
    /// Every other tensor of the file (`out`, `out_f64`, `lse`, ...), by name.
    pub results: BTreeMap<String, Tensor>,
    /// Metadata keys this crate does not interpret (`name`, `torch_backend`, ...).
    pub extra_metadata: BTreeMap<String, String>,
}

const OPTION_KEYS: [&str; 7] = [
    "is_causal",
    "causal",
    "dropout_p",
    "seed",
    "offset",
    "scale",
    "enable_gqa",
];

fn parse_bool(key: &str, value: &str) -> Result<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(HarnessError::case(
            format!("metadata {key}"),
            "true or false",
            format!("{value:?}"),
        )),
    }
}

fn parse_num<T: std::str::FromStr>(key: &str, value: &str, expected: &str) -> Result<T> {
    value
        .trim()
        .parse()
        .map_err(|_| HarnessError::case(format!("metadata {key}"), expected, format!("{value:?}")))
}

/// Reads the options from `__metadata__`; absent keys take PyTorch's defaults.
pub fn parse_options(meta: &HashMap<String, String>) -> Result<SdpaOptions> {
    let get = |k: &str| meta.get(k).map(String::as_str);
    let is_causal = get("is_causal")
        .map(|v| parse_bool("is_causal", v))
        .transpose()?;
    let causal = match get("causal") {
        Some(v) => Some(v.trim().parse::<Causal>().map_err(|_| {
            HarnessError::case(
                "metadata causal",
                "none, top_left or bottom_right",
                format!("{v:?}"),
            )
        })?),
        None => None,
    };
    let causal = match (is_causal, causal) {
        (Some(true), Some(Causal::None)) => {
            return Err(HarnessError::case(
                "metadata causal",
                "top_left or bottom_right (is_causal is true)",
                "\"none\"",
            ))
        }
        (_, Some(c)) => c,
        (Some(true), None) => Causal::TopLeft,
        _ => Causal::None,
    };
    let dropout = Dropout::new(
        get("dropout_p")
            .map(|v| parse_num("dropout_p", v, "a number"))
            .transpose()?
            .unwrap_or(0.0),
        get("seed")
            .map(|v| parse_num("seed", v, "an unsigned 64-bit integer"))
            .transpose()?
            .unwrap_or(0),
        get("offset")
            .map(|v| parse_num("offset", v, "an unsigned 64-bit integer"))
            .transpose()?
            .unwrap_or(0),
    );
    let scale = match get("scale").map(str::trim) {
        None | Some("") | Some("none") | Some("None") => None,
        Some(v) => Some(parse_num("scale", v, "a number or none")?),
    };
    let enable_gqa = get("enable_gqa")
        .map(|v| parse_bool("enable_gqa", v))
        .transpose()?
        .unwrap_or(false);
    Ok(SdpaOptions {
        causal,
        dropout,
        scale,
        enable_gqa,
    })
}

/// The options as `__metadata__` strings.
pub fn options_metadata(options: &SdpaOptions) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert(
        "is_causal".into(),
        (options.causal == Causal::TopLeft).to_string(),
    );
    m.insert("causal".into(), options.causal.name().into());
    m.insert("dropout_p".into(), options.dropout.p.to_string());
    m.insert("seed".into(), options.dropout.seed.to_string());
    m.insert("offset".into(), options.dropout.offset.to_string());
    if let Some(s) = options.scale {
        m.insert("scale".into(), format!("{s:?}"));
    }
    m.insert("enable_gqa".into(), options.enable_gqa.to_string());
    m
}

impl Case {
    /// A case with no stored results.
    pub fn new(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attn_mask: Option<Tensor>,
        options: SdpaOptions,
    ) -> Self {
        Case {
            q,
            k,
            v,
            attn_mask,
            options,
            results: BTreeMap::new(),
            extra_metadata: BTreeMap::new(),
        }
    }

    /// Parses a case from the bytes of a safetensors file.
    ///
    /// # Errors
    /// An empty, truncated or non-safetensors buffer; a missing `q`, `k` or `v`; an
    /// unsupported dtype; q/k/v not 4-d or not floating point; malformed metadata.
    pub fn from_bytes(bytes: &[u8]) -> Result<Case> {
        if bytes.is_empty() {
            return Err(HarnessError::case(
                "case file",
                "a safetensors file",
                "an empty file",
            ));
        }
        let (_, metadata) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| {
            HarnessError::case(
                "case file",
                "a safetensors file",
                format!("unreadable header ({e})"),
            )
        })?;
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| {
            HarnessError::case(
                "case file",
                "a safetensors file",
                format!("unreadable data ({e})"),
            )
        })?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let tensor = Tensor::from_le_bytes(view.dtype(), view.shape(), view.data())
                .ok_or_else(|| {
                    HarnessError::case(
                        format!("tensor {name}"),
                        format!("data matching shape {:?}", view.shape()),
                        format!("{} bytes", view.data().len()),
                    )
                })?
                .map_err(|got| {
                    HarnessError::case(
                        format!("tensor {name}"),
                        "dtype F64, F32, F16, BF16 or BOOL",
                        got,
                    )
                })?;
            tensors.insert(name, tensor);
        }
        let meta = metadata.metadata().clone().unwrap_or_default();
        let options = parse_options(&meta)?;
        let mut take = |name: &str| {
            tensors.remove(name).ok_or_else(|| {
                HarnessError::case("case file", format!("a tensor named {name}"), "none")
            })
        };
        let q = take("q")?;
        let k = take("k")?;
        let v = take("v")?;
        for (name, t) in [("q", &q), ("k", &k), ("v", &v)] {
            if t.shape().len() != 4 {
                return Err(HarnessError::case(
                    format!("tensor {name}"),
                    "4 dims [B, H, L, E]",
                    format!("{} dims {:?}", t.shape().len(), t.shape()),
                ));
            }
            if t.dtype().is_none() {
                return Err(HarnessError::case(
                    format!("tensor {name}"),
                    "a floating-point dtype",
                    "bool",
                ));
            }
        }
        let attn_mask = tensors.remove("attn_mask");
        let extra_metadata = meta
            .into_iter()
            .filter(|(k, _)| !OPTION_KEYS.contains(&k.as_str()))
            .collect();
        Ok(Case {
            q,
            k,
            v,
            attn_mask,
            options,
            results: tensors,
            extra_metadata,
        })
    }

    /// Reads a case file.
    ///
    /// # Errors
    /// I/O errors and everything [`Case::from_bytes`] rejects, prefixed with the path.
    pub fn read(path: impl AsRef<Path>) -> Result<Case> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| HarnessError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Case::from_bytes(&bytes).map_err(|e| match e {
            HarnessError::Case {
                what,
                expected,
                actual,
            } => HarnessError::Case {
                what: format!("{}: {what}", path.display()),
                expected,
                actual,
            },
            other => other,
        })
    }

    /// Serialises the case (inputs, results and metadata) as safetensors bytes.
    /// Deterministic: the same case gives the same bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut named: Vec<(String, &Tensor)> = vec![
            ("q".into(), &self.q),
            ("k".into(), &self.k),
            ("v".into(), &self.v),
        ];
        if let Some(m) = &self.attn_mask {
            named.push(("attn_mask".into(), m));
        }
        named.extend(self.results.iter().map(|(n, t)| (n.clone(), t)));
        let mut meta = options_metadata(&self.options);
        meta.extend(self.extra_metadata.clone());
        Ok(serialize(&named, &meta))
    }

    /// Writes the case to `path`.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_bytes()?;
        std::fs::write(path, bytes).map_err(|source| HarnessError::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// A stored result tensor by name.
    pub fn result(&self, name: &str) -> Option<&Tensor> {
        self.results.get(name)
    }

    /// `name` from the metadata, if the file has one.
    pub fn name(&self) -> Option<&str> {
        self.extra_metadata.get("name").map(String::as_str)
    }
}

/// Every tensor and the metadata of any safetensors file, whatever the tensors' ranks:
/// what the nested and module goldens hold (`q [total, H, E]`, weights, `x`), which
/// [`Case`] (4-d `q`, `k`, `v`) does not describe.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorFile {
    /// Float and bool tensors by name.
    pub tensors: BTreeMap<String, Tensor>,
    /// Integer tensors (I32, I64, U32: offsets such as `cu_seqlens`) widened to i64.
    pub integers: BTreeMap<String, ndarray::ArrayD<i64>>,
    /// `__metadata__`.
    pub metadata: BTreeMap<String, String>,
}

/// Reads any safetensors file into a [`TensorFile`].
///
/// # Errors
/// An empty, truncated or non-safetensors buffer; a tensor whose data does not match
/// its shape; a dtype other than F64, F32, F16, BF16, BOOL, I32, I64, U32.
pub fn read_tensor_file(bytes: &[u8]) -> Result<TensorFile> {
    let not_safetensors = |what: &str, e: safetensors::SafeTensorError| {
        HarnessError::case(
            "tensor file",
            "a safetensors file",
            format!("unreadable {what} ({e})"),
        )
    };
    if bytes.is_empty() {
        return Err(HarnessError::case(
            "tensor file",
            "a safetensors file",
            "an empty file",
        ));
    }
    let (_, header) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| not_safetensors("header", e))?;
    let st =
        safetensors::SafeTensors::deserialize(bytes).map_err(|e| not_safetensors("data", e))?;
    let mut file = TensorFile {
        tensors: BTreeMap::new(),
        integers: BTreeMap::new(),
        metadata: header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
    };
    for (name, view) in st.tensors() {
        let (shape, data) = (view.shape(), view.data());
        let mismatch = || {
            HarnessError::case(
                format!("tensor {name}"),
                format!("data matching shape {shape:?}"),
                format!("{} bytes", data.len()),
            )
        };
        let ints = |width: usize, parse: fn(&[u8]) -> i64| -> Result<ndarray::ArrayD<i64>> {
            let numel: usize = shape.iter().product();
            if data.len() != numel * width {
                return Err(mismatch());
            }
            let values = data.chunks_exact(width).map(parse).collect();
            ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(shape), values).map_err(|_| mismatch())
        };
        use safetensors::Dtype as D;
        let widened = match view.dtype() {
            D::I32 => Some(ints(4, |c| {
                i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64
            })?),
            D::U32 => Some(ints(4, |c| {
                u32::from_le_bytes(c.try_into().expect("4 bytes")) as i64
            })?),
            D::I64 => Some(ints(8, |c| {
                i64::from_le_bytes(c.try_into().expect("8 bytes"))
            })?),
            _ => None,
        };
        if let Some(a) = widened {
            file.integers.insert(name, a);
            continue;
        }
        let tensor = Tensor::from_le_bytes(view.dtype(), shape, data)
            .ok_or_else(mismatch)?
            .map_err(|got| {
                HarnessError::case(
                    format!("tensor {name}"),
                    "dtype F64, F32, F16, BF16, BOOL, I32, I64 or U32",
                    got,
                )
            })?;
        file.tensors.insert(name, tensor);
    }
    Ok(file)
}

/// Writes safetensors bytes with a deterministic header: `__metadata__` first with its
/// keys sorted, then the tensors in the order their data is laid out (widest dtype
/// first, then by name, as the `safetensors` crate lays them out). The crate's own
/// serialiser writes metadata in `HashMap` order, which changes from run to run, and
/// golden files must be reproducible byte for byte.
pub fn serialize(tensors: &[(String, &Tensor)], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let mut order: Vec<&(String, &Tensor)> = tensors.iter().collect();
    order.sort_by(|a, b| {
        let width = |t: &Tensor| t.safetensors_dtype().size();
        width(b.1).cmp(&width(a.1)).then(a.0.cmp(&b.0))
    });
    let mut header = String::from("{");
    if !metadata.is_empty() {
        let entries: Vec<String> = metadata
            .iter()
            .map(|(k, v)| format!("{}:{}", json_string(k), json_string(v)))
            .collect();
        let _ = write!(header, "\"__metadata__\":{{{}}}", entries.join(","));
    }
    let mut data = Vec::new();
    for (i, (name, tensor)) in order.iter().enumerate() {
        let bytes = tensor.to_le_bytes();
        let start = data.len();
        data.extend_from_slice(&bytes);
        if i > 0 || !metadata.is_empty() {
            header.push(',');
        }
        let dims: Vec<String> = tensor.shape().iter().map(|d| d.to_string()).collect();
        let _ = write!(
            header,
            "{}:{{\"dtype\":\"{:?}\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
            json_string(name),
            tensor.safetensors_dtype(),
            dims.join(","),
            start,
            data.len()
        );
    }
    header.push('}');
    // The format pads the header with spaces to a multiple of 8 bytes.
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = Vec::with_capacity(8 + header.len() + data.len());
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&data);
    out
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("a str always serialises")
}
