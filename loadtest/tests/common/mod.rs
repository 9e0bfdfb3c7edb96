//! Starts a herald server in this process on 127.0.0.1 port 0 and describes
//! it as a load-test [`Target`]; dropping [`InProcess`] shuts it down.

use herald_loadtest::probe::Probe;
use herald_loadtest::Target;
use herald_server::config::Config;
use herald_server::server::Server;
use tokio::sync::oneshot;

pub struct InProcess {
    pub target: Target,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl InProcess {
    pub async fn start() -> InProcess {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().to_path_buf(),
            quic_addr: "127.0.0.1:0".parse().unwrap(),
            http_addr: "127.0.0.1:0".parse().unwrap(),
            ..Config::default()
        };
        let server = Server::bind(config).await.unwrap();
        let http = server.http_addr();
        let target = Target {
            quic: server.quic_addr(),
            api: format!("http://{http}"),
            admin_key: server.secrets().admin_key.clone(),
            jwt_secret: server.secrets().jwt_secret.clone(),
            trust: herald_client::ClientTrust::pinned_file(&server.certificate_file()).unwrap(),
            probe: Probe::Metrics(format!("http://{http}/metrics")),
        };
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        InProcess {
            target,
            stop: Some(stop),
            task: Some(task),
            _dir: dir,
        }
    }

    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}
