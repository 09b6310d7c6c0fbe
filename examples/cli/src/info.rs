//! `ember info` and `ember selfcheck`.

use clap::Args;
use ember::gpu::{list_adapters, BackendChoice};
use ember::{Context, Result};

#[derive(Args)]
pub struct InfoArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Also list every adapter found (for EMBER_ADAPTER).
    #[arg(long)]
    all: bool,
}

#[derive(Args)]
pub struct SelfcheckArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run_info(a: InfoArgs) -> Result<()> {
    let ctx = Context::new()?;
    let info = ctx.info();
    let caps = ctx.caps();
    let adapters: Vec<serde_json::Value> = if a.all {
        list_adapters(BackendChoice::Any)
            .iter()
            .enumerate()
            .map(|(i, a)| {
                serde_json::json!({"index": i, "name": a.name, "backend": format!("{:?}", a.backend),
                    "device_type": format!("{:?}", a.device_type), "driver_info": a.driver_info})
            })
            .collect()
    } else {
        Vec::new()
    };
    if a.json {
        let mut v = serde_json::json!({
            "ember_version": ember::VERSION,
            "adapter": info,
            "capabilities": caps,
        });
        if a.all {
            v["adapters"] = serde_json::Value::Array(adapters);
        }
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    println!("ember {}", ember::VERSION);
    println!("adapter:   {} ({})", info.name, info.device_type);
    println!("backend:   {}", info.backend);
    println!("driver:    {} {}", info.driver, info.driver_info);
    println!(
        "features:  f16={} subgroups={} (size {}..{}) timestamps={}",
        caps.f16, caps.subgroups, caps.subgroup_min_size, caps.subgroup_max_size, caps.timestamps
    );
    println!("enabled:   {}", info.enabled_features.join(", "));
    let l = &info.limits;
    println!(
        "limits:    storage binding {} MiB, buffer {} MiB, workgroup memory {} KiB, {} invocations, {} storage buffers/stage",
        l.max_storage_buffer_binding_size >> 20,
        l.max_buffer_size >> 20,
        l.max_compute_workgroup_storage_size >> 10,
        l.max_compute_invocations_per_workgroup,
        l.max_storage_buffers_per_shader_stage
    );
    for v in adapters {
        println!("  {v}");
    }
    Ok(())
}

pub fn run_selfcheck(a: SelfcheckArgs) -> Result<()> {
    let ctx = Context::new()?;
    let report = ember::kernels::selfcheck::run(&ctx)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        println!(
            "self-check on {} ({}):",
            ctx.info().name,
            ctx.info().backend
        );
        for c in &report.checks {
            println!(
                "  {:<34} {:<9} max error {:.1e} (tolerance {:.0e})  {}",
                c.kernel,
                c.variant,
                c.max_error,
                c.tolerance,
                if c.ok { "ok" } else { "FAILED" }
            );
        }
    }
    let failed = report.checks.iter().filter(|c| !c.ok).count();
    if failed == 0 {
        if !a.json {
            println!("all {} checks passed", report.checks.len());
        }
        Ok(())
    } else {
        Err(ember::Error::Internal(format!(
            "{failed} self-checks failed"
        )))
    }
}
