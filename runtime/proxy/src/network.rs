//! The proxy network: a small DeepLab-like encoder–decoder in tch.
//!
//! Encoder: two strided 3×3 stages to output stride 4, two residual blocks (dilation 1 and 2),
//! an ASPP head (1×1, 3×3 at dilations 2 and 4, and image pooling). Decoder: bilinear
//! upsampling to stride 2, concatenation with the stride-2 features, a 3×3 convolution, a
//! 1×1 classifier, and bilinear upsampling to the input size. Inputs must have sides that
//! are multiples of [`STRIDE`]. Parameters are initialized from tch's generator, so
//! `tch::manual_seed` before [`ProxyNet::new`] fixes them.

use tch::nn::{self, ModuleT};
use tch::Tensor;

/// The output stride: input sides must be multiples of it.
pub const STRIDE: usize = 4;

#[derive(Debug)]
struct ConvBn {
    conv: nn::Conv2D,
    norm: nn::BatchNorm,
}

impl ConvBn {
    fn new(path: nn::Path, input: i64, output: i64, kernel: i64, stride: i64, dilation: i64) -> ConvBn {
        let config =
            nn::ConvConfig { stride, padding: dilation * (kernel / 2), dilation, bias: false, ..Default::default() };
        ConvBn {
            conv: nn::conv2d(&path / "conv", input, output, kernel, config),
            norm: nn::batch_norm2d(&path / "bn", output, Default::default()),
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        self.norm.forward_t(&x.apply(&self.conv), train).relu()
    }
}

/// The proxy segmentation network.
#[derive(Debug)]
pub struct ProxyNet {
    stem: ConvBn,
    stem2: ConvBn,
    down: ConvBn,
    blocks: Vec<(ConvBn, ConvBn)>,
    aspp: Vec<ConvBn>,
    pool: ConvBn,
    project: ConvBn,
    fuse: ConvBn,
    classifier: nn::Conv2D,
}

impl ProxyNet {
    /// `width`: channels at stride 2 (doubled at stride 4).
    pub fn new(path: &nn::Path, classes: usize, width: i64) -> ProxyNet {
        let deep = 2 * width;
        let blocks = (0..2)
            .map(|i| {
                let dilation = 1 + i as i64;
                (
                    ConvBn::new(path / format!("block{i}a"), deep, deep, 3, 1, dilation),
                    ConvBn::new(path / format!("block{i}b"), deep, deep, 3, 1, dilation),
                )
            })
            .collect();
        let aspp = vec![
            ConvBn::new(path / "aspp1", deep, width, 1, 1, 1),
            ConvBn::new(path / "aspp2", deep, width, 3, 1, 2),
            ConvBn::new(path / "aspp4", deep, width, 3, 1, 4),
        ];
        ProxyNet {
            stem: ConvBn::new(path / "stem", 3, width, 3, 2, 1),
            stem2: ConvBn::new(path / "stem2", width, width, 3, 1, 1),
            down: ConvBn::new(path / "down", width, deep, 3, 2, 1),
            blocks,
            aspp,
            pool: ConvBn::new(path / "pool", deep, width, 1, 1, 1),
            project: ConvBn::new(path / "project", 4 * width, deep, 1, 1, 1),
            fuse: ConvBn::new(path / "fuse", deep + width, deep, 3, 1, 1),
            classifier: nn::conv2d(path / "classifier", deep, classes as i64, 1, Default::default()),
        }
    }
}

impl ModuleT for ProxyNet {
    fn forward_t(&self, images: &Tensor, train: bool) -> Tensor {
        let size = images.size();
        let (h, w) = (size[2], size[3]);
        let low = self.stem2.forward(&self.stem.forward(images, train), train);
        let mut x = self.down.forward(&low, train);
        for (a, b) in &self.blocks {
            x = (b.forward(&a.forward(&x, train), train) + &x).relu();
        }
        let (dh, dw) = (x.size()[2], x.size()[3]);
        let mut branches: Vec<Tensor> = self.aspp.iter().map(|branch| branch.forward(&x, train)).collect();
        let pooled = self.pool.forward(&x.adaptive_avg_pool2d([1, 1]), train);
        branches.push(pooled.expand([-1, -1, dh, dw], false));
        let x = self.project.forward(&Tensor::cat(&branches, 1), train);
        let x = x.upsample_bilinear2d([low.size()[2], low.size()[3]], false, None, None);
        let x = self.fuse.forward(&Tensor::cat(&[x, low], 1), train);
        x.apply(&self.classifier).upsample_bilinear2d([h, w], false, None, None)
    }
}
