//! Regularizers for continual learning, applied to the gradient on the GPU after each
//! step's backward and before the optimizer, and an exponential moving average of the
//! parameters.
//!
//! - L2 toward an anchor (the previous version of the adapter): `grad += lambda (theta -
//!   theta*)`, the gradient of `lambda/2 ||theta - theta*||^2`.
//! - EWC: the same pull weighted per parameter by a diagonal Fisher estimate `F` (the
//!   empirical Fisher: the mean of squared gradients over batches of past data, computed on
//!   the GPU by the training step itself, then normalized to mean 1 so that `lambda` means
//!   the same as for L2): `grad += lambda F (theta - theta*)`.
//! - EMA: after every update `ema = beta ema + (1 - beta) theta`, a smoothed copy that can be
//!   kept instead of the last iterate.

use crate::error::{Error, Result};
use crate::gpu::{Context, DType, Dispatch, Tensor};
use crate::kernels::elementwise::{binary, unary, BinaryOp, UnaryOp};

/// The anchor pull in effect.
pub struct Anchor {
    /// The anchor parameters `theta*`.
    pub values: Tensor,
    /// Per-parameter weights (EWC's Fisher), or none (L2).
    pub fisher: Option<Tensor>,
    /// Strength.
    pub lambda: f32,
    /// `grad += lambda [F] (theta - theta*)`.
    pub ops: Vec<Dispatch>,
}

/// Scratch shared by the regularizers: one vector of the parameter buffer's size.
pub struct RegScratch {
    /// `[n]` f32.
    pub tmp: Tensor,
    n: usize,
}

impl RegScratch {
    /// Scratch for `n` parameters.
    pub fn new(ctx: &Context, n: usize) -> Result<RegScratch> {
        Ok(RegScratch {
            tmp: Tensor::zeros(ctx, &[n], DType::F32)?,
            n,
        })
    }

    /// The dispatches of `grad += lambda [fisher] (param - anchor)`.
    pub fn pull(
        &self,
        ctx: &Context,
        param: &Tensor,
        grad: &Tensor,
        anchor: &Tensor,
        fisher: Option<&Tensor>,
        lambda: f32,
    ) -> Result<Vec<Dispatch>> {
        if !lambda.is_finite() || lambda < 0.0 {
            return Err(Error::InvalidArgument(format!(
                "regularizer strength {lambda}"
            )));
        }
        let n = self.n;
        let mut ops = vec![binary(
            ctx,
            BinaryOp::Sub,
            &self.tmp,
            Some(param),
            anchor,
            n,
            n,
        )?];
        if let Some(f) = fisher {
            ops.push(binary(ctx, BinaryOp::Mul, &self.tmp, None, f, n, n)?);
        }
        ops.push(unary(ctx, UnaryOp::Scale(lambda), &self.tmp, None, n)?);
        ops.push(binary(ctx, BinaryOp::Add, grad, None, &self.tmp, n, n)?);
        Ok(ops)
    }

    /// The dispatches of `fisher += grad^2`.
    pub fn square_add(
        &self,
        ctx: &Context,
        grad: &Tensor,
        fisher: &Tensor,
    ) -> Result<Vec<Dispatch>> {
        let n = self.n;
        Ok(vec![
            binary(ctx, BinaryOp::Mul, &self.tmp, Some(grad), grad, n, n)?,
            binary(ctx, BinaryOp::Add, fisher, None, &self.tmp, n, n)?,
        ])
    }

    /// The dispatches of `ema = beta ema + (1 - beta) param`.
    pub fn ema(
        &self,
        ctx: &Context,
        ema: &Tensor,
        param: &Tensor,
        beta: f32,
    ) -> Result<Vec<Dispatch>> {
        if !(0.0..1.0).contains(&beta) {
            return Err(Error::InvalidArgument(format!(
                "EMA decay {beta} (0 <= beta < 1)"
            )));
        }
        let n = self.n;
        Ok(vec![
            unary(ctx, UnaryOp::Scale(beta), ema, None, n)?,
            unary(ctx, UnaryOp::Scale(1.0 - beta), &self.tmp, Some(param), n)?,
            binary(ctx, BinaryOp::Add, ema, None, &self.tmp, n, n)?,
        ])
    }
}
