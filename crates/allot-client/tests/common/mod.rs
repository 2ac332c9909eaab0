//! The server the client tests talk to: an in-process `allot_server` on a
//! real loopback socket.

use std::path::Path;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running server.
pub struct Srv {
    pub addr: std::net::SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), allot_server::ServerError>>,
}

pub async fn start(data: &Path, listen: &str, token: Option<&str>) -> Srv {
    let mut c = allot_server::Config::new(data);
    c.listen = listen.to_string();
    c.token = token.map(str::to_string);
    c.shutdown_timeout = Duration::from_secs(5);
    let server = allot_server::Server::bind(c).await.unwrap();
    let addr = server.local_addr();
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    Srv { addr, stop, task }
}

impl Srv {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}
