//! The patched backward pass of candle-core (vendor/candle-core/DPTRAIN_PATCH.md): a tensor's
//! first gradient is stored as it is instead of being added to a fresh zero tensor, later ones
//! are added. These tests check the values of that against hand-derived gradients, and that the
//! patch is really the crate in use (the sign of a −0.0 first gradient survives only with it).

use candle_core::{Device, Tensor, Var};

#[test]
fn backward_keeps_a_first_gradient_as_it_is() {
    // f = Σ x ⊙ c: df/dx = c, whose one entry −0.0 the published crate turns into 0 + (−0.0) = +0.0.
    let dev = Device::Cpu;
    let x = Var::new(&[1.5f32, -2.0, 3.0], &dev).unwrap();
    let c = Tensor::new(&[-0.0f32, 2.0, -0.5], &dev).unwrap();
    let f = (x.as_tensor() * &c).unwrap().sum_all().unwrap();
    let grads = f.backward().unwrap();
    let g: Vec<f32> = grads.get(x.as_tensor()).unwrap().to_vec1().unwrap();
    assert_eq!(g, vec![-0.0, 2.0, -0.5]);
    assert!(g[0].is_sign_negative(), "the first gradient was added to zeros (unpatched candle-core)");
}

#[test]
fn backward_sums_several_contributions_including_transposed_ones() {
    // f = Σ x ⊙ a + Σ xᵀ ⊙ b + Σ x ⊙ x + Σ (3x) over x [2, 3]:
    // df/dx = a + bᵀ + 2x + 3 (four contributions, one arriving as a transposed view).
    let dev = Device::Cpu;
    let xs = [[0.25f32, -1.0, 2.0], [4.0, 0.5, -3.0]];
    let a = [[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]];
    let b = [[0.5f32, -0.5], [1.5, -1.5], [2.5, -2.5]];
    let x = Var::new(&xs, &dev).unwrap();
    let at = Tensor::new(&a, &dev).unwrap();
    let bt = Tensor::new(&b, &dev).unwrap();
    let xt = x.as_tensor();
    let f = ((xt * &at).unwrap().sum_all().unwrap()
        + (xt.t().unwrap() * &bt).unwrap().sum_all().unwrap()
        + (xt * xt).unwrap().sum_all().unwrap()
        + (xt * 3.0).unwrap().sum_all().unwrap())
    .unwrap();
    let grads = f.backward().unwrap();
    let g = grads.get(xt).unwrap();
    assert!(g.is_contiguous(), "stored gradients are contiguous, as the sums with zeros were");
    let g: Vec<Vec<f32>> = g.to_vec2().unwrap();
    for i in 0..2 {
        for j in 0..3 {
            let want = a[i][j] + b[j][i] + 2.0 * xs[i][j] + 3.0;
            assert_eq!(g[i][j], want, "df/dx[{i}][{j}]");
        }
    }
}

#[test]
fn backward_gives_a_transposed_only_gradient_contiguous_and_right() {
    // The only contribution to x's gradient arrives transposed: it is stored as a contiguous copy.
    let dev = Device::Cpu;
    let x = Var::new(&[[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &dev).unwrap();
    let w = Tensor::new(&[[1.0f32, -1.0], [2.0, -2.0], [3.0, -3.0]], &dev).unwrap();
    let f = (x.as_tensor().t().unwrap() * &w).unwrap().sum_all().unwrap();
    let grads = f.backward().unwrap();
    let g = grads.get(x.as_tensor()).unwrap();
    assert!(g.is_contiguous());
    assert_eq!(g.to_vec2::<f32>().unwrap(), vec![vec![1.0, 2.0, 3.0], vec![-1.0, -2.0, -3.0]]);
}
