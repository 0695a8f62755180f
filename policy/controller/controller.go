// Package controller is the single cluster-wide writer of sidelane's Istio
// EnvoyFilters and of L7Policy status. Every agent runs it behind a
// coordination.k8s.io Lease (RunLeader), so exactly one writes at a time and
// no extra Deployment is needed; a new leader simply reconciles the whole
// state again. Each pass is level-based: compile every policy against every
// pod, create or update the EnvoyFilters that should exist, delete sidelane's
// EnvoyFilters that should not (garbage collection that does not depend on
// kube-controller-manager), and write each policy's status.
package controller

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"sort"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/sidelane/sidelane/policy/api/v1alpha1"
	"github.com/sidelane/sidelane/policy/compile"
	"github.com/sidelane/sidelane/policy/envoyfilter"
)

// Resources the controller reads and writes.
var (
	L7PolicyGVR    = schema.GroupVersionResource{Group: v1alpha1.Group, Version: v1alpha1.Version, Resource: v1alpha1.Resource}
	EnvoyFilterGVR = schema.GroupVersionResource{Group: "networking.istio.io", Version: "v1alpha3", Resource: "envoyfilters"}
)

// Condition types beyond v1alpha1.ConditionAccepted.
const (
	// ConditionEnforced: True when every pod group the policy selects got
	// its EnvoyFilter; False (reason SelectorConflict) when a group cannot
	// be isolated by a label-only workload selector.
	ConditionEnforced      = "Enforced"
	ReasonProgrammed       = "Programmed"
	ReasonSelectorConflict = "SelectorConflict"
	fieldManager           = "sidelane"
)

// Log attribute keys.
const (
	attrName      = "name"
	attrNamespace = "namespace"
	attrError     = "error"
)

// Controller reconciles EnvoyFilters and policy status.
type Controller struct {
	log         *slog.Logger
	kube        kubernetes.Interface
	dyn         dynamic.Interface
	trustDomain string
	metrics     *metrics

	pods     corelisters.PodLister
	policies cache.GenericLister
	filters  cache.GenericLister
	synced   []cache.InformerSynced
	start    func(<-chan struct{})
	trigger  chan struct{}
}

// New wires informers; call Run to start them and reconcile.
func New(log *slog.Logger, kube kubernetes.Interface, dyn dynamic.Interface, trustDomain string, reg prometheus.Registerer) (*Controller, error) {
	m, err := newMetrics(reg)
	if err != nil {
		return nil, err
	}
	c := &Controller{log: log, kube: kube, dyn: dyn, trustDomain: trustDomain, metrics: m, trigger: make(chan struct{}, 1)}
	kf := informers.NewSharedInformerFactory(kube, 0)
	df := dynamicinformer.NewDynamicSharedInformerFactory(dyn, 0)
	managed := dynamicinformer.NewFilteredDynamicSharedInformerFactory(dyn, 0, metav1.NamespaceAll, func(o *metav1.ListOptions) {
		o.LabelSelector = envoyfilter.LabelManagedBy + "=" + envoyfilter.ManagedByValue
	})
	podInf := kf.Core().V1().Pods()
	polInf := df.ForResource(L7PolicyGVR)
	efInf := managed.ForResource(EnvoyFilterGVR)
	h := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { c.Trigger() },
		UpdateFunc: func(any, any) { c.Trigger() },
		DeleteFunc: func(any) { c.Trigger() },
	}
	for _, inf := range []cache.SharedIndexInformer{podInf.Informer(), polInf.Informer(), efInf.Informer()} {
		if _, err := inf.AddEventHandler(h); err != nil {
			return nil, fmt.Errorf("controller: event handler: %w", err)
		}
		c.synced = append(c.synced, inf.HasSynced)
	}
	c.pods, c.policies, c.filters = podInf.Lister(), polInf.Lister(), efInf.Lister()
	c.start = func(stop <-chan struct{}) { kf.Start(stop); df.Start(stop); managed.Start(stop) }
	return c, nil
}

// Trigger asks for a reconcile pass (coalesced).
func (c *Controller) Trigger() {
	select {
	case c.trigger <- struct{}{}:
	default:
	}
}

// Run reconciles until ctx ends, retrying failed passes with backoff.
func (c *Controller) Run(ctx context.Context) error {
	c.start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), c.synced...) {
		return fmt.Errorf("controller: caches did not sync: %w", ctx.Err())
	}
	c.Trigger()
	backoff := time.Second
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-c.trigger:
		}
		if err := c.Reconcile(ctx); err != nil {
			c.metrics.errors.Inc()
			c.log.Error("l7 policy reconcile", attrError, err)
			time.AfterFunc(backoff, c.Trigger)
			backoff = min(2*backoff, time.Minute)
			continue
		}
		backoff = time.Second
	}
}

// Reconcile makes one full pass from the informer caches.
func (c *Controller) Reconcile(ctx context.Context) error {
	objs, err := c.policies.List(labels.Everything())
	if err != nil {
		return err
	}
	policies := DecodePolicies(c.log, objs)
	podObjs, err := c.pods.List(labels.Everything())
	if err != nil {
		return err
	}
	inv := Inventory(podObjs)
	res, err := compile.Compile(policies, inv, compile.Options{Identity: compile.IdentityPeerCertificate, TrustDomain: c.trustDomain})
	if err != nil {
		return err
	}
	desired, groupErrs := envoyfilter.Build(res, inv.Pods, policies)

	var errs []error
	keep := map[string]bool{}
	for _, want := range desired {
		keep[want.GetNamespace()+"/"+want.GetName()] = true
		if err := c.write(ctx, want); err != nil {
			errs = append(errs, err)
		}
	}
	existing, err := c.filters.List(labels.Everything())
	if err != nil {
		return err
	}
	for _, o := range existing {
		u := o.(*unstructured.Unstructured)
		if keep[u.GetNamespace()+"/"+u.GetName()] {
			continue
		}
		err := c.dyn.Resource(EnvoyFilterGVR).Namespace(u.GetNamespace()).Delete(ctx, u.GetName(), metav1.DeleteOptions{})
		if err != nil && !apierrors.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("delete envoyfilter %s/%s: %w", u.GetNamespace(), u.GetName(), err))
			continue
		}
		c.metrics.writes.WithLabelValues("delete").Inc()
		c.log.Info("envoyfilter deleted", attrNamespace, u.GetNamespace(), attrName, u.GetName())
	}

	conflicts := map[string][]string{}
	for _, ge := range groupErrs {
		for _, p := range ge.Policies {
			k := ge.Namespace + "/" + p
			conflicts[k] = append(conflicts[k], ge.Err.Error())
		}
	}
	valid, invalid := 0, 0
	for i, rep := range res.Policies {
		if rep.Err != nil {
			invalid++
		} else {
			valid++
		}
		if err := c.writeStatus(ctx, &policies[i], rep, conflicts[rep.Namespace+"/"+rep.Name]); err != nil {
			errs = append(errs, err)
		}
	}
	c.metrics.policies.WithLabelValues("accepted").Set(float64(valid))
	c.metrics.policies.WithLabelValues("invalid").Set(float64(invalid))
	c.metrics.filters.Set(float64(len(desired)))
	if len(errs) > 0 {
		return fmt.Errorf("reconcile: %d errors, first: %w", len(errs), errs[0])
	}
	return nil
}

// write creates or updates one EnvoyFilter, skipping the call when the
// cached object already says the same.
func (c *Controller) write(ctx context.Context, want *unstructured.Unstructured) error {
	ns, name := want.GetNamespace(), want.GetName()
	if o, err := c.filters.ByNamespace(ns).Get(name); err == nil {
		have := o.(*unstructured.Unstructured)
		if equality.Semantic.DeepEqual(have.Object["spec"], want.Object["spec"]) &&
			equality.Semantic.DeepEqual(have.GetOwnerReferences(), want.GetOwnerReferences()) &&
			have.GetAnnotations()[envoyfilter.AnnotationPolicies] == want.GetAnnotations()[envoyfilter.AnnotationPolicies] {
			return nil
		}
	}
	_, err := c.dyn.Resource(EnvoyFilterGVR).Namespace(ns).Apply(ctx, name, want, metav1.ApplyOptions{FieldManager: fieldManager, Force: true})
	if err != nil {
		return fmt.Errorf("apply envoyfilter %s/%s: %w", ns, name, err)
	}
	c.metrics.writes.WithLabelValues("apply").Inc()
	c.log.Info("envoyfilter applied", attrNamespace, ns, attrName, name, "policies", want.GetAnnotations()[envoyfilter.AnnotationPolicies])
	return nil
}

func (c *Controller) writeStatus(ctx context.Context, p *v1alpha1.L7Policy, rep compile.PolicyReport, conflicts []string) error {
	st := p.Status.DeepCopy()
	st.ObservedGeneration = p.Generation
	st.SelectedPods = int32(rep.SelectedPods)
	accepted := metav1.Condition{Type: v1alpha1.ConditionAccepted, Status: metav1.ConditionTrue, Reason: v1alpha1.ReasonValid, Message: "the policy is valid", ObservedGeneration: p.Generation}
	enforced := metav1.Condition{Type: ConditionEnforced, Status: metav1.ConditionTrue, Reason: ReasonProgrammed,
		Message: fmt.Sprintf("EnvoyFilters cover the %d selected pods", rep.SelectedPods), ObservedGeneration: p.Generation}
	if rep.Err != nil {
		accepted.Status, accepted.Reason, accepted.Message = metav1.ConditionFalse, v1alpha1.ReasonInvalid, rep.Err.Error()
		enforced.Status, enforced.Reason, enforced.Message = metav1.ConditionFalse, v1alpha1.ReasonInvalid, "the policy is invalid and changes nothing"
	} else if len(conflicts) > 0 {
		enforced.Status, enforced.Reason, enforced.Message = metav1.ConditionFalse, ReasonSelectorConflict, strings.Join(conflicts, "; ")
	}
	meta.SetStatusCondition(&st.Conditions, accepted)
	meta.SetStatusCondition(&st.Conditions, enforced)
	if equality.Semantic.DeepEqual(*st, p.Status) {
		return nil
	}
	obj, err := runtime.DefaultUnstructuredConverter.ToUnstructured(&v1alpha1.L7Policy{
		TypeMeta:   metav1.TypeMeta{APIVersion: v1alpha1.SchemeGroupVersion.String(), Kind: v1alpha1.Kind},
		ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: p.Namespace, ResourceVersion: p.ResourceVersion},
		Spec:       p.Spec,
		Status:     *st,
	})
	if err != nil {
		return err
	}
	_, err = c.dyn.Resource(L7PolicyGVR).Namespace(p.Namespace).UpdateStatus(ctx, &unstructured.Unstructured{Object: obj}, metav1.UpdateOptions{FieldManager: fieldManager})
	if err != nil && !apierrors.IsConflict(err) && !apierrors.IsNotFound(err) {
		return fmt.Errorf("status of l7policy %s/%s: %w", p.Namespace, p.Name, err)
	}
	return nil
}

// DecodePolicies turns the L7Policy informer's objects into policies,
// sorted by namespace/name; undecodable ones are logged and skipped.
func DecodePolicies(log *slog.Logger, objs []runtime.Object) []v1alpha1.L7Policy {
	policies := make([]v1alpha1.L7Policy, 0, len(objs))
	for _, o := range objs {
		var p v1alpha1.L7Policy
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.(*unstructured.Unstructured).Object, &p); err != nil {
			log.Warn("undecodable l7policy", attrError, err)
			continue
		}
		policies = append(policies, p)
	}
	sort.Slice(policies, func(i, j int) bool {
		return policies[i].Namespace+"/"+policies[i].Name < policies[j].Namespace+"/"+policies[j].Name
	})
	return policies
}

// Inventory is the compiler's view of the running pods (finished and
// terminating ones are left out).
func Inventory(pods []*corev1.Pod) compile.Inventory {
	var inv compile.Inventory
	for _, p := range pods {
		if p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed || p.DeletionTimestamp != nil {
			continue
		}
		inv.Pods = append(inv.Pods, toPod(p))
	}
	return inv
}

func toPod(p *corev1.Pod) compile.Pod {
	out := compile.Pod{Namespace: p.Namespace, Name: p.Name, Labels: p.Labels, ServiceAccount: p.Spec.ServiceAccountName}
	for _, ip := range p.Status.PodIPs {
		if a, err := netip.ParseAddr(ip.IP); err == nil {
			out.IPs = append(out.IPs, a)
		}
	}
	return out
}

type metrics struct {
	policies *prometheus.GaugeVec
	filters  prometheus.Gauge
	writes   *prometheus.CounterVec
	errors   prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		policies: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "sidelane_l7_policies", Help: "L7Policies by state (accepted, invalid) at the last reconcile."}, []string{"state"}),
		filters:  prometheus.NewGauge(prometheus.GaugeOpts{Name: "sidelane_l7_envoyfilters", Help: "EnvoyFilters sidelane wants to exist."}),
		writes:   prometheus.NewCounterVec(prometheus.CounterOpts{Name: "sidelane_l7_envoyfilter_writes_total", Help: "EnvoyFilter writes by operation (apply, delete)."}, []string{"op"}),
		errors:   prometheus.NewCounter(prometheus.CounterOpts{Name: "sidelane_l7_reconcile_errors_total", Help: "Failed reconcile passes."}),
	}
	if reg != nil {
		for _, col := range []prometheus.Collector{m.policies, m.filters, m.writes, m.errors} {
			if err := reg.Register(col); err != nil {
				return nil, fmt.Errorf("register l7 metrics: %w", err)
			}
		}
	}
	return m, nil
}
