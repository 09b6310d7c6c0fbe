//! The JavaScript face of [`Engine`] (wasm32 only). Results come back as JSON strings and
//! errors as thrown `Error`s whose message is Ember's; a call that is still awaiting the GPU
//! must finish before the next one starts (wasm-bindgen throws "recursive use" otherwise).

use wasm_bindgen::prelude::*;

use crate::{Engine, GenerateRequest, TrainRequest};

#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(js_namespace = console, js_name = error)]
    fn console_error(s: &str);
}

/// Panics end up in the browser console with their message, not as "unreachable".
#[wasm_bindgen(start)]
pub fn start() {
    std::panic::set_hook(Box::new(|info| {
        console_error(&format!("ember panicked: {info}"))
    }));
}

fn js_err(e: ember::Error) -> JsError {
    JsError::new(&e.to_string())
}

/// Calls `f(arg)`, ignoring what it returns or throws (a progress display must not stop
/// the work it displays).
fn notify(f: &js_sys::Function, arg: JsValue) {
    let _ = f.call1(&JsValue::NULL, &arg);
}

/// A model loaded on the browser's GPU, ready to generate and to train.
#[wasm_bindgen]
pub struct EmberEngine {
    engine: Engine,
}

#[wasm_bindgen]
impl EmberEngine {
    /// Loads a GGUF model from its bytes; `progress(fraction)` is called while it loads.
    pub async fn load(
        bytes: Vec<u8>,
        name: String,
        progress: js_sys::Function,
    ) -> Result<EmberEngine, JsError> {
        let mut tick = |f: f32| notify(&progress, JsValue::from_f64(f as f64));
        let engine = Engine::load(bytes, &name, &mut tick)
            .await
            .map_err(js_err)?;
        Ok(EmberEngine { engine })
    }

    /// The device and model as JSON.
    pub fn info(&self) -> String {
        self.engine.info().to_string()
    }

    /// Generates from `prompt`, calling `on_text(piece)` as text comes; resolves to JSON
    /// (`text`, `prompt_ids`, `tokens`, `stop`, timings).
    pub async fn generate(
        &mut self,
        prompt: String,
        max_tokens: u32,
        chat: bool,
        temperature: f32,
        use_adapter: bool,
        on_text: js_sys::Function,
    ) -> Result<String, JsError> {
        let req = GenerateRequest {
            prompt,
            max_tokens: max_tokens as usize,
            chat,
            temperature,
            use_adapter,
        };
        let mut cb = |piece: &str| notify(&on_text, JsValue::from_str(piece));
        let out = self.engine.generate(&req, &mut cb).await.map_err(js_err)?;
        Ok(out.to_string())
    }

    /// Trains the LoRA adapter on JSONL examples, calling `on_step(json)` after each step;
    /// resolves to JSON (`losses`, `examples`, `tokens`, `secs`).
    #[allow(clippy::too_many_arguments)]
    pub async fn train(
        &mut self,
        jsonl: String,
        steps: u32,
        batch_size: u32,
        lr: f32,
        rank: u32,
        seq: u32,
        seed: u32,
        on_step: js_sys::Function,
    ) -> Result<String, JsError> {
        let req = TrainRequest {
            jsonl,
            steps,
            batch_size: batch_size as usize,
            lr,
            rank: rank as usize,
            seq: seq as usize,
            seed: seed as u64,
        };
        let mut cb = |s: &ember::train::StepStats| {
            let j = serde_json::to_string(s).unwrap_or_default();
            notify(&on_step, JsValue::from_str(&j));
        };
        let out = self.engine.train(&req, &mut cb).await.map_err(js_err)?;
        Ok(out.to_string())
    }

    /// Checks every inference kernel family against its CPU reference on this GPU; resolves
    /// to the report as JSON (`checks`: kernel, variant, max_error, tolerance, ok).
    pub async fn selfcheck(&self) -> Result<String, JsError> {
        Ok(self.engine.selfcheck().await.map_err(js_err)?.to_string())
    }

    /// Drops the trained adapter.
    pub fn forget(&mut self) -> Result<(), JsError> {
        self.engine.forget().map_err(js_err)
    }
}
