//! Criterion benches of the compiler's stages on every example metric: parse + check +
//! lower + relax (`compile_source`), and ONNX emission of the loss and of the exact-count
//! graph with serialization. Run with `cargo bench -p losscc-compiler`.

use compiler::curve::Curve;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use std::path::Path;

fn examples() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
        .expect("examples directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "metric"))
        // Loss files `use` other files; the benches compile self-contained metrics.
        .filter_map(|p| {
            let text = std::fs::read_to_string(&p).ok()?;
            (!text.contains("use \"")).then(|| (p.file_stem().unwrap().to_string_lossy().to_string(), text))
        })
        .collect();
    files.sort();
    files
}

fn passes(c: &mut Criterion) {
    let files = examples();
    let mut group = c.benchmark_group("compile_source");
    for (name, text) in &files {
        group.bench_function(name.as_str(), |b| {
            b.iter(|| compiler::compile_source(black_box(name), black_box(text), &[]).expect("compiles"))
        });
    }
    group.finish();
    let mut group = c.benchmark_group("emit_onnx");
    for (name, text) in &files {
        let compiled = compiler::compile_source(name, text, &[]).expect("compiles");
        let curves: Vec<Curve> = compiled.manifest().curves.iter().map(|c| Curve::identity(c.pieces)).collect();
        group.bench_function(format!("{name}/loss"), |b| {
            b.iter(|| {
                compiler::onnx::to_bytes(
                    &compiler::onnx::emit_loss(black_box(&compiled), &curves, &Default::default()).expect("emits"),
                )
            })
        });
        group.bench_function(format!("{name}/exact"), |b| {
            b.iter(|| {
                compiler::onnx::to_bytes(
                    &compiler::onnx::emit_exact(black_box(&compiled), &Default::default()).expect("emits"),
                )
            })
        });
    }
    group.finish();
}

criterion_group!(benches, passes);
criterion_main!(benches);
