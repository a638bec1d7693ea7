//! Output formats shared by every command that prints cluster data.

use clap::ValueEnum;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Format {
    #[default]
    Table,
    Json,
    Yaml,
}

/// Prints a message in the protobuf JSON mapping, as JSON or YAML.
pub fn print_structured<M: prost::Message + prost::Name>(
    format: Format,
    msgs: &[M],
    single: bool,
) -> anyhow::Result<()> {
    let values = msgs
        .iter()
        .map(|m| {
            metropolis_api::json::to_json(m).map_err(|e| anyhow::anyhow!("rendering JSON: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let value = if single {
        values.into_iter().next().unwrap_or(serde_json::Value::Null)
    } else {
        serde_json::Value::Array(values)
    };
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&value)?),
        Format::Yaml => print!("{}", serde_norway::to_string(&value)?),
        Format::Table => anyhow::bail!("table output is rendered by the command"),
    }
    Ok(())
}

pub fn table() -> comfy_table::Table {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING);
    t
}
