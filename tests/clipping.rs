//! Claims about per-example clipping: norms bounded by C, small gradients untouched, non-finite
//! gradients zeroed and counted, and the tensor implementation equal to its f64 loop twin.

use candle_core::{Device, Tensor};
use dptrain::privacy::clip::{clip_and_sum, clip_and_sum_reference};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

fn random_rows(rng: &mut ChaCha20Rng, b: usize, p: usize) -> Vec<Vec<f32>> {
    (0..b)
        .map(|i| {
            // Mix of scales: some rows far above C, some well below.
            let scale = if i % 3 == 0 { 0.01 } else { 3.0 };
            (0..p).map(|_| rng.random_range(-1.0f32..1.0) * scale).collect()
        })
        .collect()
}

fn tensor(rows: &[Vec<f32>]) -> Tensor {
    let p = rows.first().map_or(0, |r| r.len());
    Tensor::from_vec(rows.concat(), (rows.len(), p), &Device::Cpu).unwrap()
}

#[test]
fn clipped_sum_matches_f64_reference_on_random_inputs() {
    let mut rng = ChaCha20Rng::seed_from_u64(11);
    for &(b, p) in &[(1usize, 7usize), (5, 33), (17, 1000), (64, 257)] {
        let rows = random_rows(&mut rng, b, p);
        let (fast, stats) = clip_and_sum(&tensor(&rows), Some(1.5)).unwrap();
        let (slow, nonfinite) = clip_and_sum_reference(&rows, 1.5);
        assert_eq!(stats.nonfinite, nonfinite);
        let fast: Vec<f32> = fast.to_vec1().unwrap();
        for (a, s) in fast.iter().zip(&slow) {
            assert!((*a as f64 - s).abs() <= 1e-5 + 1e-5 * s.abs(), "{a} vs {s}");
        }
    }
}

#[test]
fn every_clipped_gradient_has_norm_at_most_c_and_small_ones_are_unchanged() {
    let mut rng = ChaCha20Rng::seed_from_u64(12);
    let rows = random_rows(&mut rng, 12, 300);
    let c = 1.0;
    for (i, row) in rows.iter().enumerate() {
        let (clipped, _) = clip_and_sum(&tensor(std::slice::from_ref(row)), Some(c)).unwrap();
        let clipped: Vec<f32> = clipped.to_vec1().unwrap();
        let norm = clipped.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        assert!(norm <= c * (1.0 + 1e-6), "row {i}: clipped norm {norm}");
        let orig = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        if orig < c {
            assert_eq!(clipped, *row, "row {i} under C must be unchanged");
        }
    }
}

#[test]
fn non_finite_per_example_gradient_is_zeroed_and_counted() {
    let mut rng = ChaCha20Rng::seed_from_u64(13);
    let mut rows = random_rows(&mut rng, 4, 50);
    let clean_sum: Vec<f32> =
        clip_and_sum(&tensor(&[rows[0].clone(), rows[2].clone()]), Some(1.0)).unwrap().0.to_vec1().unwrap();
    rows[1][7] = f32::NAN;
    rows[3][0] = f32::INFINITY;
    let (sum, stats) = clip_and_sum(&tensor(&rows), Some(1.0)).unwrap();
    assert_eq!(stats.nonfinite, 2);
    let sum: Vec<f32> = sum.to_vec1().unwrap();
    assert!(sum.iter().all(|v| v.is_finite()));
    for (a, b) in sum.iter().zip(&clean_sum) {
        assert!((a - b).abs() < 1e-6, "the bad rows must contribute exactly nothing");
    }
}

#[test]
fn empty_micro_batch_sums_to_zero() {
    let (sum, stats) =
        clip_and_sum(&Tensor::zeros((0, 9), candle_core::DType::F32, &Device::Cpu).unwrap(), Some(1.0)).unwrap();
    assert_eq!(sum.to_vec1::<f32>().unwrap(), vec![0.0; 9]);
    assert_eq!(stats.norms.len(), 0);
}

/// Claim: automatic clipping (the fused kernels the DP step runs) scales every example by
/// C·(1 − 2⁻²⁰)/(‖g‖ + γ): the clipped sum equals the f64 twin, every scaled example's norm stays
/// below C in f32 whatever its size (tiny ones are scaled up, never past C), and a gradient of
/// norm ≫ γ lands just under C.
#[test]
fn automatic_clipping_scales_every_example_below_c_and_matches_its_f64_twin() {
    use dptrain::kernels::{clip_factors_kind, clipped_sum, per_example_sq_norms};
    use dptrain::privacy::{clip_and_sum_reference_kind, ClipKind};
    let mut rng = ChaCha20Rng::seed_from_u64(21);
    let kind = ClipKind::Automatic { stability: 0.01 };
    let c = 2.0;
    for &(b, p) in &[(1usize, 7usize), (5, 33), (17, 1000), (64, 257)] {
        let mut rows = random_rows(&mut rng, b, p);
        rows[0].iter_mut().for_each(|v| *v *= 1e-4); // a tiny gradient, norm ≈ γ
        let t = tensor(&rows);
        let sq = per_example_sq_norms(std::slice::from_ref(&t)).unwrap();
        let f = clip_factors_kind(&sq, Some(c), kind).unwrap();
        let fast: Vec<f32> = clipped_sum(std::slice::from_ref(&t), &f).unwrap().to_vec1().unwrap();
        let (slow, _) = clip_and_sum_reference_kind(&rows, c, kind);
        for (a, s) in fast.iter().zip(&slow) {
            assert!((*a as f64 - s).abs() <= 1e-5 + 1e-5 * s.abs(), "{a} vs {s}");
        }
        for (i, (row, &fi)) in rows.iter().zip(&f.to_vec1::<f32>().unwrap()).enumerate() {
            let norm = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
            let scaled: Vec<f32> = row.iter().map(|v| v * fi).collect();
            let scaled_norm = scaled.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
            assert!(scaled_norm < c, "row {i}: scaled norm {scaled_norm} ≥ C");
            let want = c * norm / (norm + 0.01);
            assert!((scaled_norm - want).abs() <= 1e-5 * want, "row {i}: {scaled_norm} vs {want}");
            if norm > 1.0 {
                assert!(scaled_norm > 0.99 * c, "row {i}: a large gradient lands just under C");
            }
        }
    }
}

#[test]
fn a_whole_gradient_factor_for_per_layer_clipping_is_refused_by_name() {
    let sq = Tensor::new(&[4.0f64, 0.25], &Device::Cpu).unwrap();
    let e = dptrain::kernels::clip_factors_kind(&sq, Some(1.0), dptrain::privacy::ClipKind::PerLayer).unwrap_err();
    assert!(e.to_string().contains("per-layer"), "{e}");
    assert_eq!(dptrain::privacy::ClipKind::PerLayer.factor(2.0, 1.0), None);
    assert!(dptrain::privacy::ClipKind::Flat.factor(2.0, 1.0).is_some_and(|f| f < 0.5));
}
