//! Proxy-task data: the built-in synthetic scenes and VOC-layout folders on disk.
//!
//! Guarantees: the synthetic dataset is a pure function of its [`SyntheticSpec`] (same seed,
//! same bytes, on every machine: each image has its own ChaCha stream); a VOC folder either
//! loads completely or fails with one sentence that names the file and what to do. Images are
//! stored CHW as normalized `f32`; labels as `i64` with 255 for ignored pixels.

use compiler::ir::DEFAULT_IGNORE_LABEL;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The label value of ignored pixels.

/// Class names of the built-in scenes, in label order.
pub const SYNTHETIC_CLASSES: [&str; 5] = ["background", "blob", "box", "ring", "thin"];

/// One image with its label map.
#[derive(Clone, Debug)]
pub struct Sample {
    pub name: String,
    pub height: usize,
    pub width: usize,
    /// `3 × height × width`, channel-major, normalized to roughly zero mean and unit spread.
    pub image: Vec<f32>,
    /// `height × width` class indices; [`DEFAULT_IGNORE_LABEL`] marks pixels that do not count.
    pub label: Vec<i64>,
}

/// Train, reward hold-out and test splits.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub description: String,
    pub classes: usize,
    pub train: Vec<Sample>,
    pub holdout: Vec<Sample>,
    pub test: Vec<Sample>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Holdout,
    Test,
}

impl Dataset {
    pub fn split(&self, split: Split) -> &[Sample] {
        match split {
            Split::Train => &self.train,
            Split::Holdout => &self.holdout,
            Split::Test => &self.test,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("the data folder `{0}` does not exist; pass --data with a VOC-layout folder (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/) or leave --data out for the built-in scenes")]
    NoFolder(String),
    #[error("cannot read `{path}`: {error}; a VOC-layout folder needs it")]
    Io { path: String, error: std::io::Error },
    #[error("`{list}` names `{name}`, but neither `{jpg}` nor `{png}` exists; add the image or remove the line")]
    MissingImage { list: String, name: String, jpg: String, png: String },
    #[error("`{list}` names `{name}`, but its label `{path}` does not exist; add the label PNG or remove the line")]
    MissingLabel { list: String, name: String, path: String },
    #[error("cannot decode image `{path}`: {error}")]
    Image { path: String, error: String },
    #[error("cannot decode label `{path}`: {error}; labels must be palette or 8-bit grayscale index PNGs")]
    Label { path: String, error: String },
    #[error("image `{image}` is {iw}×{ih} but its label `{label}` is {lw}×{lh}; they must be the same size")]
    SizeMismatch { image: String, label: String, iw: usize, ih: usize, lw: usize, lh: usize },
    #[error("label `{path}` has value {value} at row {row}, column {column}, but the data has {classes} classes (0..{last}; {ignored}); pass --classes with the right count, --ignore-label with the value that marks ignored pixels, or fix the label")]
    LabelValue { path: String, value: i64, row: usize, column: usize, classes: usize, last: usize, ignored: String },
    #[error("`{0}` lists no images; a split needs at least one")]
    EmptySplit(String),
    #[error("the training list has {0} image(s); at least 2 are needed to hold some out for the search reward (or give ImageSets/Segmentation/holdout.txt)")]
    TooFewTrain(usize),
    #[error("the labels hold only class 0; a segmentation task needs at least 2 classes")]
    OneClass,
}

/// The built-in dataset's size and seed.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SyntheticSpec {
    pub seed: u64,
    /// Images are `size × size` pixels.
    pub size: usize,
    pub train: usize,
    pub holdout: usize,
    pub test: usize,
    /// Mark a 1-pixel band outside every object as ignored (255), as VOC does.
    pub ignore_band: bool,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        SyntheticSpec { seed: 0, size: 80, train: 192, holdout: 48, test: 96, ignore_band: true }
    }
}

/// Scenes of blobs, boxes, rings and thin strokes over textured background, with color
/// noise and blur that make boundaries hard to place.
pub fn synthetic(spec: &SyntheticSpec) -> Dataset {
    let make = |split: u64, count: usize| -> Vec<Sample> {
        (0..count)
            .map(|index| {
                let stream = spec.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (split << 40) ^ index as u64;
                synthetic_scene(spec, ChaCha8Rng::seed_from_u64(stream), format!("scene{split}_{index:04}"))
            })
            .collect()
    };
    Dataset {
        description: format!(
            "built-in scenes (seed {}, {}×{} px, {} train / {} hold-out / {} test, {} classes)",
            spec.seed,
            spec.size,
            spec.size,
            spec.train,
            spec.holdout,
            spec.test,
            SYNTHETIC_CLASSES.len()
        ),
        classes: SYNTHETIC_CLASSES.len(),
        train: make(1, spec.train),
        holdout: make(2, spec.holdout),
        test: make(3, spec.test),
    }
}

fn synthetic_scene(spec: &SyntheticSpec, mut rng: ChaCha8Rng, name: String) -> Sample {
    let size = spec.size;
    let s = size as f64;
    let mut label = vec![0i64; size * size];
    // Per-pixel colour before noise; the background is a sum of random gratings.
    let mut color = vec![[0f64; 3]; size * size];
    let base: [f64; 3] = [rng.gen_range(0.35..0.65), rng.gen_range(0.35..0.65), rng.gen_range(0.35..0.65)];
    let gratings: Vec<(f64, f64, f64, f64)> = (0..3)
        .map(|_| {
            (rng.gen_range(-0.4..0.4), rng.gen_range(-0.4..0.4), rng.gen_range(0.0..6.3), rng.gen_range(0.05..0.15))
        })
        .collect();
    for y in 0..size {
        for x in 0..size {
            for (c, value) in color[y * size + x].iter_mut().enumerate() {
                let (fx, fy, phase, amp) = gratings[c];
                *value = base[c] + amp * (fx * x as f64 + fy * y as f64 + phase).sin();
            }
        }
    }
    let palette: [[f64; 3]; 5] =
        [[0.5, 0.5, 0.5], [0.8, 0.35, 0.3], [0.35, 0.7, 0.35], [0.3, 0.35, 0.8], [0.85, 0.8, 0.25]];
    let objects = rng.gen_range(2..=5);
    for _ in 0..objects {
        let class = rng.gen_range(1..=4usize);
        let tint: [f64; 3] = std::array::from_fn(|c| (palette[class][c] + rng.gen_range(-0.2..0.2)).clamp(0.0, 1.0));
        let stripes = (rng.gen_range(0.3..1.2), rng.gen_range(0.0..6.3), rng.gen_range(0.0..0.12));
        let (cx, cy) = (rng.gen_range(0.1..0.9) * s, rng.gen_range(0.1..0.9) * s);
        let angle: f64 = rng.gen_range(0.0..std::f64::consts::PI);
        let (sin, cos) = angle.sin_cos();
        let shape: Box<dyn Fn(f64, f64) -> bool> = match class {
            1 => {
                let (a, b) = (rng.gen_range(0.07..0.2) * s, rng.gen_range(0.07..0.2) * s);
                Box::new(move |u, v| (u / a).powi(2) + (v / b).powi(2) <= 1.0)
            }
            2 => {
                let (a, b) = (rng.gen_range(0.06..0.18) * s, rng.gen_range(0.06..0.18) * s);
                Box::new(move |u: f64, v: f64| u.abs() <= a && v.abs() <= b)
            }
            3 => {
                let outer = rng.gen_range(0.1..0.22) * s;
                let inner = outer - rng.gen_range(2.0..(0.5 * outer).max(2.5));
                Box::new(move |u: f64, v: f64| {
                    let r = (u * u + v * v).sqrt();
                    r <= outer && r >= inner
                })
            }
            _ => {
                let half_length = rng.gen_range(0.15..0.4) * s;
                let half_width = rng.gen_range(0.6..1.3);
                let bend = rng.gen_range(-0.02..0.02);
                Box::new(move |u: f64, v: f64| u.abs() <= half_length && (v - bend * u * u).abs() <= half_width)
            }
        };
        for y in 0..size {
            for x in 0..size {
                let (dx, dy) = (x as f64 + 0.5 - cx, y as f64 + 0.5 - cy);
                let (u, v) = (dx * cos + dy * sin, -dx * sin + dy * cos);
                if shape(u, v) {
                    label[y * size + x] = class as i64;
                    let texture = stripes.2 * (stripes.0 * u + stripes.1).sin();
                    for c in 0..3 {
                        color[y * size + x][c] = tint[c] + texture;
                    }
                }
            }
        }
    }
    let noise = Normal::new(0.0, 0.09).expect("a positive spread");
    for pixel in color.iter_mut() {
        for value in pixel.iter_mut() {
            *value += noise.sample(&mut rng);
        }
    }
    // A 3×3 box blur softens every boundary.
    let mut image = vec![0f32; 3 * size * size];
    for y in 0..size {
        for x in 0..size {
            for c in 0..3 {
                let mut sum = 0.0;
                let mut count = 0.0;
                for ny in y.saturating_sub(1)..(y + 2).min(size) {
                    for nx in x.saturating_sub(1)..(x + 2).min(size) {
                        sum += color[ny * size + nx][c];
                        count += 1.0;
                    }
                }
                image[c * size * size + y * size + x] = ((sum / count - 0.5) / 0.25) as f32;
            }
        }
    }
    if spec.ignore_band {
        let original = label.clone();
        for y in 0..size {
            for x in 0..size {
                if original[y * size + x] != 0 {
                    continue;
                }
                let near_object = [(-1i64, 0i64), (1, 0), (0, -1), (0, 1)].iter().any(|(dy, dx)| {
                    let (ny, nx) = (y as i64 + dy, x as i64 + dx);
                    ny >= 0
                        && nx >= 0
                        && (ny as usize) < size
                        && (nx as usize) < size
                        && original[ny as usize * size + nx as usize] != 0
                });
                if near_object {
                    label[y * size + x] = DEFAULT_IGNORE_LABEL;
                }
            }
        }
    }
    Sample { name, height: size, width: size, image, label }
}

/// Load a VOC-layout folder: `JPEGImages/NAME.jpg|png`, `SegmentationClass/NAME.png`,
/// `ImageSets/Segmentation/{train,val}.txt` (and `holdout.txt` if present; otherwise every
/// tenth training image is held out for the search reward). `val` is the test split.
/// `classes`: the number of classes, or `None` to take the largest label value plus one.
/// `ignore_label`: the label value that marks ignored pixels in the files (`None`: every
/// pixel is labelled); in memory such pixels carry [`DEFAULT_IGNORE_LABEL`], as the built-in
/// scenes' do.
pub fn load_voc(dir: &Path, classes: Option<usize>, ignore_label: Option<i64>) -> Result<Dataset, DataError> {
    if !dir.is_dir() {
        return Err(DataError::NoFolder(dir.display().to_string()));
    }
    let lists = dir.join("ImageSets").join("Segmentation");
    let read_list = |name: &str| -> Result<(PathBuf, Vec<String>), DataError> {
        let path = lists.join(name);
        let text = std::fs::read_to_string(&path)
            .map_err(|error| DataError::Io { path: path.display().to_string(), error })?;
        let names: Vec<String> =
            text.lines().map(str::trim).filter(|line| !line.is_empty()).map(|line| line.to_string()).collect();
        if names.is_empty() {
            return Err(DataError::EmptySplit(path.display().to_string()));
        }
        Ok((path, names))
    };
    let (train_list, train_names) = read_list("train.txt")?;
    let (test_list, test_names) = read_list("val.txt")?;
    let holdout_path = lists.join("holdout.txt");
    let (train_names, holdout_list, holdout_names) = if holdout_path.exists() {
        let (path, names) = read_list("holdout.txt")?;
        (train_names, path, names)
    } else {
        if train_names.len() < 2 {
            return Err(DataError::TooFewTrain(train_names.len()));
        }
        let (kept, held): (Vec<_>, Vec<_>) = train_names.into_iter().enumerate().partition(|(i, _)| i % 10 != 9);
        let mut kept: Vec<String> = kept.into_iter().map(|(_, n)| n).collect();
        let mut held: Vec<String> = held.into_iter().map(|(_, n)| n).collect();
        if held.is_empty() {
            held.push(kept.pop().expect("at least two training images"));
        }
        (kept, train_list.clone(), held)
    };
    // The files' ignore value becomes the in-memory marker; with none, every value is a
    // class (and one that reads as the marker is out of range below).
    let ignored_in_files = |value: i64| Some(value) == ignore_label;
    let load = |list: &Path, names: &[String]| -> Result<Vec<Sample>, DataError> {
        names
            .iter()
            .map(|name| {
                let mut sample = load_voc_sample(dir, list, name)?;
                for value in sample.label.iter_mut() {
                    *value = if ignored_in_files(*value) {
                        DEFAULT_IGNORE_LABEL
                    } else if *value == DEFAULT_IGNORE_LABEL {
                        // A class value that collides with the marker: kept out of range.
                        i64::MAX
                    } else {
                        *value
                    };
                }
                Ok(sample)
            })
            .collect()
    };
    let train = load(&train_list, &train_names)?;
    let holdout = load(&holdout_list, &holdout_names)?;
    let test = load(&test_list, &test_names)?;
    let all = || train.iter().chain(&holdout).chain(&test);
    let classes = match classes {
        Some(classes) => classes,
        None => {
            let largest = all()
                .flat_map(|s| s.label.iter().copied())
                .filter(|&v| v != DEFAULT_IGNORE_LABEL && v != i64::MAX)
                .max()
                .unwrap_or(0);
            largest as usize + 1
        }
    };
    if classes < 2 {
        return Err(DataError::OneClass);
    }
    for sample in all() {
        if let Some(position) =
            sample.label.iter().position(|&v| v != DEFAULT_IGNORE_LABEL && (v < 0 || v >= classes as i64))
        {
            let value = sample.label[position];
            return Err(DataError::LabelValue {
                path: dir.join("SegmentationClass").join(format!("{}.png", sample.name)).display().to_string(),
                value: if value == i64::MAX { DEFAULT_IGNORE_LABEL } else { value },
                row: position / sample.width,
                column: position % sample.width,
                classes,
                last: classes - 1,
                ignored: match ignore_label {
                    Some(ignore) => format!("{ignore} = ignored"),
                    None => "no value is ignored".to_string(),
                },
            });
        }
    }
    Ok(Dataset {
        description: format!(
            "{} ({} train / {} hold-out / {} test, {} classes)",
            dir.display(),
            train.len(),
            holdout.len(),
            test.len(),
            classes
        ),
        classes,
        train,
        holdout,
        test,
    })
}

fn load_voc_sample(dir: &Path, list: &Path, name: &str) -> Result<Sample, DataError> {
    let jpg = dir.join("JPEGImages").join(format!("{name}.jpg"));
    let png = dir.join("JPEGImages").join(format!("{name}.png"));
    let image_path = if jpg.exists() {
        jpg
    } else if png.exists() {
        png
    } else {
        return Err(DataError::MissingImage {
            list: list.display().to_string(),
            name: name.to_string(),
            jpg: jpg.display().to_string(),
            png: png.display().to_string(),
        });
    };
    let label_path = dir.join("SegmentationClass").join(format!("{name}.png"));
    if !label_path.exists() {
        return Err(DataError::MissingLabel {
            list: list.display().to_string(),
            name: name.to_string(),
            path: label_path.display().to_string(),
        });
    }
    let rgb = image::open(&image_path)
        .map_err(|e| DataError::Image { path: image_path.display().to_string(), error: e.to_string() })?
        .to_rgb8();
    let (width, height) = (rgb.width() as usize, rgb.height() as usize);
    let (label, label_width, label_height) = read_index_png(&label_path)?;
    if (label_width, label_height) != (width, height) {
        return Err(DataError::SizeMismatch {
            image: image_path.display().to_string(),
            label: label_path.display().to_string(),
            iw: width,
            ih: height,
            lw: label_width,
            lh: label_height,
        });
    }
    let mut image = vec![0f32; 3 * height * width];
    for (x, y, pixel) in rgb.enumerate_pixels() {
        for c in 0..3 {
            image[c * height * width + y as usize * width + x as usize] = (pixel[c] as f32 / 255.0 - 0.5) / 0.25;
        }
    }
    Ok(Sample { name: name.to_string(), height, width, image, label })
}

/// The raw indices of a palette or 8-bit grayscale PNG (a palette is not applied).
fn read_index_png(path: &Path) -> Result<(Vec<i64>, usize, usize), DataError> {
    let fail = |error: String| DataError::Label { path: path.display().to_string(), error };
    let file = std::fs::File::open(path).map_err(|error| DataError::Io { path: path.display().to_string(), error })?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::IDENTITY);
    let mut reader = decoder.read_info().map_err(|e| fail(e.to_string()))?;
    let mut buffer = vec![0u8; reader.output_buffer_size().ok_or_else(|| fail("the image is too large".into()))?];
    let frame = reader.next_frame(&mut buffer).map_err(|e| fail(e.to_string()))?;
    let (width, height) = (frame.width as usize, frame.height as usize);
    let depth = frame.bit_depth as usize;
    match (frame.color_type, frame.bit_depth) {
        (
            png::ColorType::Indexed,
            png::BitDepth::One | png::BitDepth::Two | png::BitDepth::Four | png::BitDepth::Eight,
        )
        | (png::ColorType::Grayscale, png::BitDepth::Eight) => {}
        (color, bits) => return Err(fail(format!("it is {color:?} with {bits:?} bits per sample"))),
    }
    let mut label = Vec::with_capacity(width * height);
    for row in buffer[..frame.buffer_size()].chunks(frame.line_size).take(height) {
        for x in 0..width {
            let bit = x * depth;
            let byte = row[bit / 8];
            let value = (byte >> (8 - depth - bit % 8)) & ((1u16 << depth) - 1) as u8;
            label.push(value as i64);
        }
    }
    Ok((label, width, height))
}

/// A training batch: random crops of `crop × crop` (padded with ignored pixels where an image
/// is smaller) and random horizontal flips, drawn from `rng`.
pub fn training_batch(samples: &[Sample], batch: usize, crop: usize, rng: &mut ChaCha8Rng) -> (Tensor, Tensor) {
    let mut images = vec![0f32; batch * 3 * crop * crop];
    let mut labels = vec![DEFAULT_IGNORE_LABEL; batch * crop * crop];
    for b in 0..batch {
        let sample = &samples[rng.gen_range(0..samples.len())];
        let y0 = if sample.height > crop { rng.gen_range(0..=sample.height - crop) } else { 0 };
        let x0 = if sample.width > crop { rng.gen_range(0..=sample.width - crop) } else { 0 };
        let flip = rng.gen_bool(0.5);
        let plane = sample.height * sample.width;
        for y in 0..crop.min(sample.height) {
            for x in 0..crop.min(sample.width) {
                let source_x = x0 + x;
                let target_x = if flip { crop.min(sample.width) - 1 - x } else { x };
                let source = (y0 + y) * sample.width + source_x;
                labels[b * crop * crop + y * crop + target_x] = sample.label[source];
                for c in 0..3 {
                    images[((b * 3 + c) * crop + y) * crop + target_x] = sample.image[c * plane + source];
                }
            }
        }
    }
    let side = crop as i64;
    (
        Tensor::from_slice(&images).view([batch as i64, 3, side, side]),
        Tensor::from_slice(&labels).view([batch as i64, side, side]),
    )
}

/// Evaluation batches of up to `batch` images of equal size, in order, without augmentation.
/// Each image is padded on the right and bottom to a multiple of `multiple` (the network's
/// stride); the second value is the original height and width to crop predictions back to.
pub fn evaluation_batches(
    samples: &[Sample],
    batch: usize,
    multiple: usize,
    device: Device,
) -> Vec<(Tensor, Tensor, (i64, i64))> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < samples.len() {
        let (h, w) = (samples[start].height, samples[start].width);
        let mut end = start + 1;
        while end < samples.len() && end - start < batch && (samples[end].height, samples[end].width) == (h, w) {
            end += 1;
        }
        let (ph, pw) = (h.div_ceil(multiple) * multiple, w.div_ceil(multiple) * multiple);
        let n = end - start;
        let mut images = vec![0f32; n * 3 * ph * pw];
        let mut labels = Vec::with_capacity(n * h * w);
        for (b, sample) in samples[start..end].iter().enumerate() {
            for c in 0..3 {
                for y in 0..h {
                    let source = c * h * w + y * w;
                    let target = ((b * 3 + c) * ph + y) * pw;
                    images[target..target + w].copy_from_slice(&sample.image[source..source + w]);
                }
            }
            labels.extend_from_slice(&sample.label);
        }
        let images = Tensor::from_slice(&images).view([n as i64, 3, ph as i64, pw as i64]).to_device(device);
        let labels = Tensor::from_slice(&labels).view([n as i64, h as i64, w as i64]).to_kind(Kind::Int64);
        out.push((images, labels.to_device(device), (h as i64, w as i64)));
        start = end;
    }
    out
}
