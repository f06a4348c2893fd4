//! Causality: no output depends on a later position.

use burn::tensor::Tensor;

use crate::{device, normal, small_config, values, B};

#[test]
fn causal_no_output_depends_on_a_later_position() {
    let seq = 100;
    let nsa = small_config().init::<B>(&device());
    let x = normal([1, seq, 24]);
    let base = values(nsa.forward(x.clone()));
    for changed in [0, 1, 37, 64, 99] {
        let bump = Tensor::<B, 1>::from_floats([5.0], &device())
            .reshape([1, 1, 1])
            .expand([1, 1, 24]);
        let x2 = x.clone().slice_assign(
            [0..1, changed..changed + 1, 0..24],
            x.clone().slice([0..1, changed..changed + 1, 0..24]) + bump,
        );
        let out = values(nsa.forward(x2));
        for t in 0..seq {
            let row = t * 24..(t + 1) * 24;
            let diff = base[row.clone()]
                .iter()
                .zip(&out[row])
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            if t < changed {
                assert!(
                    diff <= 1e-6,
                    "output at t={t} moved by {diff} when x[{changed}] changed"
                );
            } else if t == changed {
                assert!(diff > 0.0, "output at t={t} ignores its own input");
            }
        }
    }
}
