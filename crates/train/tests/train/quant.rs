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

/// QLoRA in the model code: a decoder loaded with LoRA over an NF4 base computes what the same
/// LoRA computes over a checkpoint whose layer weights were replaced by their dequantised NF4
/// values (the same loss and adapter gradients, checkpointed as QLoRA jobs run), differs from
/// LoRA over the unquantised base, and saves the same adapter and the same merged model.
#[test]
fn lora_over_an_nf4_base_is_lora_over_the_dequantised_base() {
    use crate::checkpointing::{features, loss_and_grads, no_dropout, task, with_config};
    use tuna_train::data::Features;
    use tuna_train::loader::read_safetensors;
    use tuna_train::model::{LoraOptions, Nf4Options};

    let _g = lock();
    for name in ["llama", "qwen3", "phi3", "gemma2", "gpt2", "distilbert"] {
        let tmp = tempfile::tempdir().unwrap();
        let orig = tmp.path().join("orig");
        let deq = tmp.path().join("dequantised");
        std::fs::create_dir_all(&orig).unwrap();
        std::fs::create_dir_all(&deq).unwrap();
        with_config(name, &orig, no_dropout());
        with_config(name, &deq, no_dropout());
        // Every 2-D weight inside the layers is a linear layer's: NF4 round trip (GPT-2's
        // Conv1D weights `[in, out]` as `[out, in]`, as tuna and bitsandbytes quantise them).
        let weights = read_safetensors(&orig.join("model.safetensors")).unwrap();
        let mut replaced = 0;
        let tensors: Vec<(String, Tensor)> = weights
            .into_iter()
            .map(|(n, t)| {
                let in_layer = [".layers.", ".layer.", ".h."].iter().any(|l| n.contains(l));
                if in_layer && t.dim() == 2 {
                    replaced += 1;
                    let conv1d = n.contains(".h.");
                    let w = if conv1d { t.tr().contiguous() } else { t };
                    let w = Nf4Weight::quantize(&w, true)
                        .unwrap()
                        .dequantize(Kind::Float)
                        .unwrap();
                    (n, if conv1d { w.tr().contiguous() } else { w })
                } else {
                    (n, t)
                }
            })
            .collect();
        assert!(replaced >= 4, "{name}: {replaced} linear weights");
        save_safetensors(&deq.join("model.safetensors"), &tensors).unwrap();

        let task = task(name);
        let mut opts = crate::support::cpu_options(task.clone());
        opts.lora = Some(LoraOptions {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: vec!["all-linear".into()],
        });
        let plain = tuna_train::load_model(&orig, &opts).unwrap();
        let reference = tuna_train::load_model(&deq, &opts).unwrap();
        opts.quantization = Some(Nf4Options { double_quant: true });
        let qlora = tuna_train::load_model(&orig, &opts).unwrap();

        let feats = features(&orig, &task);
        let items: Vec<&Features> = feats.iter().collect();
        let (loss_q, grads_q) = loss_and_grads(qlora.as_ref(), &items, true);
        let (loss_r, grads_r) = loss_and_grads(reference.as_ref(), &items, true);
        let (loss_p, _) = loss_and_grads(plain.as_ref(), &items, false);
        assert!(
            (loss_q - loss_r).abs() < 1e-6,
            "{name}: loss {loss_q} vs {loss_r}"
        );
        assert!(
            (loss_q - loss_p).abs() > 1e-7,
            "{name}: NF4 changed nothing ({loss_q} vs {loss_p})"
        );
        assert_eq!(grads_q.len(), grads_r.len());
        for ((n, a), (m, b)) in grads_q.iter().zip(&grads_r) {
            assert_eq!(n, m);
            let d = f64::try_from((a - b).abs().max()).unwrap();
            assert!(d < 1e-5, "{name} {n}: gradients differ by {d}");
        }

        // The adapter (over the unquantised base, as PEFT loads it) and the merged model.
        for merge in [false, true] {
            let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
            qlora.save_pretrained(&a, merge).unwrap();
            reference.save_pretrained(&b, merge).unwrap();
            let file = if merge {
                "model.safetensors"
            } else {
                "adapter_model.safetensors"
            };
            let (ta, tb) = (
                read_safetensors(&a.join(file)).unwrap(),
                read_safetensors(&b.join(file)).unwrap(),
            );
            assert_eq!(
                ta.keys().collect::<Vec<_>>(),
                tb.keys().collect::<Vec<_>>(),
                "{name} merge {merge}"
            );
            for (k, x) in &ta {
                let d = f64::try_from((x - &tb[k]).abs().max()).unwrap();
                assert!(d < 1e-6, "{name} merge {merge} {k}: {d}");
            }
            std::fs::remove_dir_all(&a).unwrap();
            std::fs::remove_dir_all(&b).unwrap();
        }
    }
}

/// QLoRA exports as PEFT and transformers read them: the adapter loads over the unquantised base
/// with no missing or unexpected key, and over that base rounded through bitsandbytes' NF4 it
/// gives tuna's logits; the merged model (the dequantised base plus the adapters) loads alone.
#[test]
fn qlora_adapters_load_in_peft_over_the_unquantised_base() {
    use crate::export::{assert_exports_match, two_labels, Export};
    use tuna_train::model::TaskHead;
    // (perturb takes the lock itself.)
    let causal = || TaskHead::CausalLm;
    assert_exports_match(&[
        Export::new("llama_qlora", "llama", causal(), &["lora_B"])
            .lora(&["all-linear"])
            .nf4(false)
            .first(1),
        Export::new("phi3_qlora", "phi3", causal(), &["lora_B"])
            .lora(&["qkv_proj", "down_proj"])
            .nf4(false),
        Export::new("gemma2_qlora_dq", "gemma2", causal(), &["lora_B"])
            .lora(&["all-linear"])
            .nf4(true),
        Export::new("qwen3_qlora_merged", "qwen3", causal(), &["lora_B"])
            .lora(&["all-linear"])
            .nf4(true)
            .merged(),
        Export::new("gpt2_qlora", "gpt2", causal(), &["lora_B"])
            .lora(&["c_attn", "c_fc"])
            .nf4(true),
        Export::new("distilbert_qlora", "distilbert", two_labels(), &["lora_B"])
            .lora(&["all-linear"])
            .nf4(false),
    ]);
}
