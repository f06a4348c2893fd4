//! Autodiff through the layer: every gradient against finite differences in f64, and a
//! backward pass in f32.

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Distribution, Tensor, TensorData};
use nsa_burn::{Nsa, NsaConfig};

use crate::{device, small_config, AD, B};

/// Casts every float parameter to f64 (as a fresh leaf that requires a gradient).
struct ToF64;

impl<Bk: AutodiffBackend> ModuleMapper<Bk> for ToF64 {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<Bk, D>>) -> Param<Tensor<Bk, D>> {
        param.map(|t| t.cast(DType::F64).detach().require_grad())
    }
}

/// For every parameter: its id, a random direction `u` and the directional derivative
/// `<grad, u>` of the loss.
struct DirectionalGradients<'a> {
    grads: &'a <AD as AutodiffBackend>::Gradients,
    found: Vec<(ParamId, TensorData, f64)>,
}

impl ModuleVisitor<AD> for DirectionalGradients<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AD, D>>) {
        let grad = param
            .val()
            .grad(self.grads)
            .expect("every parameter gets a gradient");
        let direction = grad.random_like(Distribution::Normal(0.0, 1.0));
        let derivative = scalar((grad * direction.clone()).sum());
        self.found
            .push((param.id, direction.into_data(), derivative));
    }
}

/// Adds `step * direction` to the parameter `target`.
struct Perturb<'a> {
    target: ParamId,
    direction: &'a TensorData,
    step: f64,
}

impl ModuleMapper<B> for Perturb<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let tensor = if id == self.target {
            let direction =
                Tensor::<B, D>::from_data(self.direction.clone(), (&tensor.device(), DType::F64));
            tensor + direction.mul_scalar(self.step)
        } else {
            tensor
        };
        Param::from_mapped_value(id, tensor, mapper)
    }
}

/// The value of a one-element tensor at full precision (`into_scalar` gives the backend's
/// default element type, f32 on Flex).
fn scalar(tensor: Tensor<B, 1>) -> f64 {
    tensor
        .into_data()
        .iter::<f64>()
        .next()
        .expect("one element")
}

/// Whether an autodiff derivative matches a central difference: relative error below 1e-5,
/// with an absolute floor of 1e-7 for the difference's round-off (key biases, for one, have
/// an exactly zero gradient: softmax ignores a shift shared by a row).
fn derivatives_agree(analytic: f64, numeric: f64) -> bool {
    (analytic - numeric).abs() <= 1e-5 * numeric.abs() + 1e-7
}

#[test]
fn gradients_match_finite_differences_for_the_input_and_every_parameter() {
    // Tiny f64 layer with every optional part: MLP compressor, gate hidden layer,
    // independent K/V, T not a multiple of any block, batch 2, chunk not dividing T.
    let config = NsaConfig::new(8, 4, 2, 6, 4)
        .with_compress_block(4)
        .with_compress_stride(2)
        .with_select_block(8)
        .with_n_selected(4)
        .with_window(6)
        .with_compressor_hidden(Some(5))
        .with_gate_hidden(Some(3))
        .with_query_chunk(5);
    // T = 41: six selection blocks for n = 4, so top-n really chooses.
    let (batch, seq) = (2, 41);
    let f64_dev = (&device(), DType::F64);
    let nsa = config.init::<AD>(&device()).map(&mut ToF64);
    let x = Tensor::<B, 3>::random([batch, seq, 8], Distribution::Normal(0.0, 1.0), f64_dev);
    let weights = Tensor::<B, 3>::random([batch, seq, 8], Distribution::Normal(0.0, 1.0), f64_dev);
    let loss = |module: &Nsa<B>, x: Tensor<B, 3>| -> f64 {
        scalar((module.forward(x) * weights.clone()).sum())
    };

    let x_ad = Tensor::<AD, 3>::from_inner(x.clone()).require_grad();
    let out = nsa.forward(x_ad.clone());
    let grads = (out * Tensor::from_inner(weights.clone())).sum().backward();
    let mut visitor = DirectionalGradients {
        grads: &grads,
        found: Vec::new(),
    };
    nsa.visit(&mut visitor);
    let params = visitor.found;
    assert!(
        params.len() >= 20,
        "expected every parameter, found {}",
        params.len()
    );

    let inner = nsa.valid();
    let step = 1e-6;
    for (id, direction, analytic) in &params {
        let shifted = |sign: f64| {
            let module = inner.clone().map(&mut Perturb {
                target: *id,
                direction,
                step: sign * step,
            });
            loss(&module, x.clone())
        };
        let numeric = (shifted(1.0) - shifted(-1.0)) / (2.0 * step);
        assert!(
            derivatives_agree(*analytic, numeric),
            "parameter {id}: autodiff {analytic}, finite differences {numeric}"
        );
    }

    let x_grad = x_ad.grad(&grads).expect("input gradient");
    let direction = x_grad.random_like(Distribution::Normal(0.0, 1.0));
    let analytic = scalar((x_grad * direction.clone()).sum());
    let numeric = (loss(&inner, x.clone() + direction.clone().mul_scalar(step))
        - loss(&inner, x - direction.mul_scalar(step)))
        / (2.0 * step);
    assert!(
        derivatives_agree(analytic, numeric),
        "input: autodiff {analytic}, finite differences {numeric}"
    );
}

#[test]
fn backward_runs_through_autodiff_flex_in_f32() {
    let nsa = small_config().init::<AD>(&device());
    // T = 100: seven selection blocks for n = 4, so top-n runs under autodiff.
    let x = Tensor::<AD, 3>::random([2, 100, 24], Distribution::Normal(0.0, 1.0), &device())
        .require_grad();
    let grads = nsa.forward(x.clone()).powi_scalar(2).mean().backward();
    let grad = x.grad(&grads).expect("input gradient");
    let grad: Vec<f32> = grad.into_data().to_vec().unwrap();
    assert!(grad.iter().all(|g| g.is_finite()));
    assert!(grad.iter().any(|&g| g != 0.0));
}
