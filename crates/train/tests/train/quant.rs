//! NF4 quantisation against bitsandbytes (`python/check_nf4.py`), which runs on the CPU here:
//! the same 4-bit codes and absmaxes, the same double-quantisation offset and scales, and the
//! 8-bit absmax codes of bitsandbytes' reference implementation (the nearest map value), which
//! its CPU kernel matches but where its approximate search takes a neighbour of the nearest
//! (0.1-0.2% of codes; tuna's is then the nearer).

use tch::{Device, Kind, Tensor};
use tuna_train::loader::save_safetensors;
use tuna_train::quant::{Absmax, Nf4Weight};

use crate::support::{lock, python, workspace};

#[test]
fn codes_and_scales_equal_bitsandbytes() {
    let _g = lock();
    tch::manual_seed(11);
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = Vec::new();
    // Shapes of real projections, an odd one (partial block, odd count) and more than 256
    // blocks (several double-quantisation blocks, the last partial).
    let cases: [(&str, [i64; 2], f64); 4] = [
        ("square", [256, 256], 0.02),
        ("odd", [37, 91], 1.0),
        ("mlp", [688, 256], 0.05),
        ("wide", [1000, 1000], 0.02),
    ];
    for (name, shape, std) in cases {
        let w = Tensor::randn(shape, (Kind::Float, Device::Cpu)) * std;
        let plain = Nf4Weight::quantize(&w, false).unwrap();
        let dq = Nf4Weight::quantize(&w, true).unwrap();
        let Absmax::Plain(absmax) = &plain.absmax else {
            panic!("plain absmax")
        };
        let Absmax::Double {
            codes,
            scales,
            offset,
            ..
        } = &dq.absmax
        else {
            panic!("double quantisation")
        };
        let t = |s: &str| format!("{name}.{s}");
        tensors.push((t("weight"), w.shallow_clone()));
        tensors.push((t("packed"), plain.packed.shallow_clone()));
        tensors.push((t("absmax"), absmax.shallow_clone()));
        tensors.push((t("dq_packed"), dq.packed.shallow_clone()));
        tensors.push((t("dq_codes"), codes.shallow_clone()));
        tensors.push((t("dq_scales"), scales.shallow_clone()));
        tensors.push((t("dq_offset"), Tensor::from_slice(&[*offset as f32])));
        tensors.push((t("dq_dequantized"), dq.dequantize(Kind::Float).unwrap()));
    }
    save_safetensors(&dir.path().join("nf4.safetensors"), &tensors).unwrap();
    let out = std::process::Command::new(python())
        .arg(workspace().join("python/check_nf4.py"))
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "check_nf4.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), cases.len());
    for r in &lines {
        for key in [
            "packed_equal",
            "absmax_equal",
            "dq_packed_equal",
            "dq_offset_equal",
            "dq_scales_equal",
            "dq_near_ties_ok",
            "dq_codes_equal_reference",
        ] {
            assert_eq!(r[key], true, "{key}: {r}");
        }
        assert!(r["dq_codes_fraction_equal"].as_f64().unwrap() > 0.98, "{r}");
        // bitsandbytes' dequantisation of its state is tuna's of tuna's, to the last bit.
        assert_eq!(r["dq_dequantized_max_diff"].as_f64(), Some(0.0), "{r}");
    }
}
