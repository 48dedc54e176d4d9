//! `meshctl kube …` generators: kubelet drop-in, flannel, calico, kubeadm, kubespray (pure).
