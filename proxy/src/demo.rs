//! PLACEHOLDER: replaced by the demo helper.
use std::future::Future;
use std::path::PathBuf;
/// Runs the demo.
pub async fn run(
    _config: Option<PathBuf>,
    _shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    anyhow::bail!("demo not built yet")
}
