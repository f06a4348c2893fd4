use burn::backend::Flex;
use burn::tensor::{Distribution, Tensor};
use nsa_burn::*;

#[test]
fn smoke() {
    let device = Default::default();
    for seq in [1usize, 7, 15, 16, 17, 100, 300] {
        let config = NsaConfig::new(32, 4, 2, 8, 6)
            .with_compress_block(16)
            .with_compress_stride(8)
            .with_select_block(16)
            .with_n_selected(4)
            .with_window(24)
            .with_query_chunk(16);
        let nsa = config.init::<Flex>(&device);
        let x = Tensor::<Flex, 3>::random([2, seq, 32], Distribution::Normal(0.0, 1.0), &device);
        let out = nsa.forward_detailed(x);
        println!("{seq}: {:?} {:?}", out.output.dims(), out.selected_blocks.clone().narrow(2, seq - 1, 1).into_data());
    }
}
