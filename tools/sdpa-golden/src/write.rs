//! Case files: safetensors with a canonical header, so a file's bytes depend only on
//! its tensors and metadata.

use std::borrow::Cow;
use std::path::Path;
use tch::{Kind, Tensor};

/// One tensor's bytes, as safetensors wants them.
struct Raw {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &Raw {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn raw(name: &str, t: &Tensor) -> Result<Raw, String> {
    let (dtype, width) = match t.kind() {
        Kind::Double => (safetensors::Dtype::F64, 8),
        Kind::Float => (safetensors::Dtype::F32, 4),
        Kind::Half => (safetensors::Dtype::F16, 2),
        Kind::BFloat16 => (safetensors::Dtype::BF16, 2),
        Kind::Bool => (safetensors::Dtype::BOOL, 1),
        Kind::Int => (safetensors::Dtype::I32, 4),
        other => return Err(format!("tensor {name}: no safetensors dtype for {other:?}")),
    };
    let t = t.to_device(tch::Device::Cpu).contiguous();
    let numel = t.numel();
    let mut data = vec![0u8; numel * width];
    t.f_copy_data_u8(&mut data, numel)
        .map_err(|e| format!("tensor {name}: {e}"))?;
    Ok(Raw {
        dtype,
        shape: t.size().iter().map(|&d| d as usize).collect(),
        data,
    })
}

/// The file's bytes, laid out exactly as `sdpa_harness::case::serialize` lays out a
/// case (so reading a golden file and writing it back gives the same bytes): the header
/// starts with `__metadata__`, keys sorted, then the tensors in data order, widest dtype
/// first, then by name; the header is padded with spaces to a multiple of 8 bytes.
/// (The `safetensors` crate's own serialiser writes `__metadata__` in `HashMap` order,
/// which changes from run to run; it still checks the result here.)
pub fn case_bytes(
    tensors: &[(&str, &Tensor)],
    metadata: &[(String, String)],
) -> Result<Vec<u8>, String> {
    let mut raws = tensors
        .iter()
        .map(|(name, t)| Ok((name.to_string(), raw(name, t)?)))
        .collect::<Result<Vec<_>, String>>()?;
    raws.sort_by(|(an, a), (bn, b)| b.dtype.size().cmp(&a.dtype.size()).then(an.cmp(bn)));
    let json = |s: &str| serde_json::to_string(s).expect("a str serialises");
    let meta: std::collections::BTreeMap<&str, &str> = metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut entries = vec![format!(
        "\"__metadata__\":{{{}}}",
        meta.iter()
            .map(|(k, v)| format!("{}:{}", json(k), json(v)))
            .collect::<Vec<_>>()
            .join(",")
    )];
    let mut data = Vec::new();
    for (name, r) in &raws {
        let start = data.len();
        data.extend_from_slice(&r.data);
        let dims: Vec<String> = r.shape.iter().map(usize::to_string).collect();
        entries.push(format!(
            "{}:{{\"dtype\":\"{:?}\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
            json(name),
            r.dtype,
            dims.join(","),
            start,
            data.len()
        ));
    }
    let mut header = format!("{{{}}}", entries.join(",")).into_bytes();
    header.resize(header.len().div_ceil(8) * 8, b' ');
    let mut out = Vec::with_capacity(8 + header.len() + data.len());
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&data);
    // Whatever reads it must see the same tensors and metadata: check the round trip.
    let back = safetensors::SafeTensors::deserialize(&out).map_err(|e| e.to_string())?;
    for (name, r) in &raws {
        let view = back.tensor(name).map_err(|e| format!("{name}: {e}"))?;
        if view.data() != r.data.as_slice() || view.shape() != r.shape.as_slice() {
            return Err(format!("{name}: the header does not describe the tensor"));
        }
    }
    let (_, read) = safetensors::SafeTensors::read_metadata(&out).map_err(|e| e.to_string())?;
    let read_meta = read.metadata().clone().unwrap_or_default();
    if read_meta.len() != meta.len()
        || meta
            .iter()
            .any(|(k, v)| read_meta.get(*k).map(String::as_str) != Some(*v))
    {
        return Err("the header does not hold the metadata".into());
    }
    Ok(out)
}

/// Writes one case file; returns its size in bytes.
pub fn case_file(
    path: &Path,
    tensors: &[(&str, &Tensor)],
    metadata: &[(String, String)],
) -> Result<usize, String> {
    let bytes = case_bytes(tensors, metadata)?;
    std::fs::write(path, &bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(bytes.len())
}
