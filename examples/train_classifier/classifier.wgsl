// The model of examples/train_classifier (its host side is model.rs): a one-hidden-layer MLP's
// forward pass, its backward pass from dL/dlogits (which lsce writes) and plain SGD. Matrices
// are row-major f32.
//
// Every product is C = A B for an m x k matrix A and a k x n matrix B addressed through strides,
// so the transposed products of the backward pass (X^T dH, dZ W2^T) are the same kernel with
// other strides, and weights and biases can live at offsets in one flat parameter buffer (which
// lets a single SGD dispatch update all of them).
//
// Each entry point uses only the bindings it needs, so the pipelines' automatic layouts differ.

struct Op {
    m: u32,
    n: u32,
    k: u32,
    // A[i, p] = a[a_offset + i * a_row + p * a_col]
    a_offset: u32,
    a_row: u32,
    a_col: u32,
    // B[p, j] = b[b_offset + p * b_row + j * b_col]
    b_offset: u32,
    b_row: u32,
    b_col: u32,
    // bias[j] = b[bias_offset + j]: biases sit in the parameter buffer beside the weights.
    bias_offset: u32,
    // C[i, j] = c[c_offset + i * n + j]
    c_offset: u32,
    // SGD step size.
    lr: f32,
}

@group(0) @binding(0) var<uniform> op: Op;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
// The hidden activations, whose sign is the ReLU's derivative in the backward pass.
@group(0) @binding(3) var<storage, read> relu_out: array<f32>;
@group(0) @binding(4) var<storage, read_write> c: array<f32>;

const WG: u32 = 64u;

// (A B)[i, j].
fn dot_row_col(i: u32, j: u32) -> f32 {
    var acc = 0.0;
    for (var p = 0u; p < op.k; p++) {
        acc += a[op.a_offset + i * op.a_row + p * op.a_col] * b[op.b_offset + p * op.b_row + j * op.b_col];
    }
    return acc;
}

// C = A B (the weight gradients: X^T dH and H^T dZ).
@compute @workgroup_size(WG)
fn matmul(@builtin(global_invocation_id) id: vec3<u32>) {
    let e = id.x;
    if e >= op.m * op.n { return; }
    c[op.c_offset + e] = dot_row_col(e / op.n, e % op.n);
}

// C = A B + bias (the output layer: logits = H W2 + b2).
@compute @workgroup_size(WG)
fn linear(@builtin(global_invocation_id) id: vec3<u32>) {
    let e = id.x;
    if e >= op.m * op.n { return; }
    let j = e % op.n;
    c[op.c_offset + e] = dot_row_col(e / op.n, j) + b[op.bias_offset + j];
}

// C = relu(A B + bias) (the hidden layer: H = relu(X W1 + b1)).
@compute @workgroup_size(WG)
fn linear_relu(@builtin(global_invocation_id) id: vec3<u32>) {
    let e = id.x;
    if e >= op.m * op.n { return; }
    let j = e % op.n;
    c[op.c_offset + e] = max(dot_row_col(e / op.n, j) + b[op.bias_offset + j], 0.0);
}

// C = (A B) * relu'(hidden) (the backprop into the hidden layer: dH = (dZ W2^T) * [H > 0]).
@compute @workgroup_size(WG)
fn matmul_relu_backward(@builtin(global_invocation_id) id: vec3<u32>) {
    let e = id.x;
    if e >= op.m * op.n { return; }
    let g = dot_row_col(e / op.n, e % op.n);
    c[op.c_offset + e] = select(0.0, g, relu_out[e] > 0.0);
}

// c[c_offset + j] = sum_i A[i, j] (the bias gradients: the column sums of dZ and dH).
@compute @workgroup_size(WG)
fn column_sums(@builtin(global_invocation_id) id: vec3<u32>) {
    let j = id.x;
    if j >= op.n { return; }
    var acc = 0.0;
    for (var i = 0u; i < op.m; i++) {
        acc += a[op.a_offset + i * op.a_row + j * op.a_col];
    }
    c[op.c_offset + j] = acc;
}

// c -= lr * a over m values: every parameter at once, from the gradient buffer of the same layout.
@compute @workgroup_size(WG)
fn sgd(@builtin(global_invocation_id) id: vec3<u32>) {
    let e = id.x;
    if e >= op.m { return; }
    c[e] -= op.lr * a[e];
}
